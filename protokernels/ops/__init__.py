"""The torch.library custom ops (protokernels::<name>): schema, fake, autograd, backend routing.

One file per op. Each op takes the backend name as its last argument; the public wrapper resolves
it (see protokernels._backend) so that the op is a pure function of its arguments.
"""
