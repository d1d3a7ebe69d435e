"""Triton implementations of protokernels' ops (installed as protokernels.triton_kernels).

Each op file exports plain launch functions taking the op's canonical 3-D tensors; they are
called from the custom ops in protokernels/ops, never directly by users.
"""
