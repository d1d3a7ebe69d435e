"""The op template's registration kit: every protokernels op is a `torch.library` operator
(`protokernels::<name>`) with one schema, one implementation, one fake and one autograd formula.

`custom_op` takes the same annotated function as torch.library.custom_op and registers the same
things through the low-level torch.library.Library API: torch.compile traces the operator through
its fake, opcheck checks it, torch dispatch modes and tensor subclasses see it as one operator.

A plain eager call skips the dispatcher: it calls the implementation directly (wrapped in an
autograd.Function built from the same setup_context and backward when an input requires grad).
Why, measured on the H100 machine's host (scripts/probe_host_cost.py, RESULTS.md "Host cost per
call"): going through torch.library.custom_op costs ~26 us per call before any work (a Library
kernel 12 us, and the Python autograd kernel of register_autograd about as much again when an
input requires grad), while `torch.cdist(x, y).argmin(1)`, which these ops replace inside models,
costs ~100-150 us in all. The direct path is taken only when nothing could observe the difference:
not while torch.compile traces, no torch dispatch mode or functorch transform active, and only
plain tensors (torch.Tensor or nn.Parameter; fake tensors and other subclasses go through the
operator).
"""
from __future__ import annotations

import torch

NAMESPACE = "protokernels"
# FRAGMENT: the compiled extension registers its own *_cuda operators in the same namespace.
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack


def _direct(args) -> bool:
    """Whether an eager call may run the implementation directly (see the module docstring)."""
    if _is_compiling() or _dispatch_modes() or _functorch_level() is not None:
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


class CustomOp:
    """A defined operator: call it like the function it was made from."""

    def __init__(self, name: str, implementation):
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self.implementation = implementation
        schema = torch.library.infer_schema(implementation, mutates_args=())
        _LIBRARY.define(name + schema)
        # One implementation for every device: the backend is chosen by the public wrapper and
        # passed in as an argument (CPU tensors run the reference, or Triton's interpreter).
        _LIBRARY.impl(name, implementation, "CompositeExplicitAutograd")
        self.overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        self._function = None  # the eager autograd.Function, once an autograd formula exists
        self.__doc__ = implementation.__doc__

    def __call__(self, *args):
        if not _direct(args):
            return self.overload(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                           for a in args):
            if self._function is None:  # no autograd formula: the operator says so
                return self.overload(*args)
            return self._function.apply(*args)
        return self.implementation(*args)

    def register_fake(self, fake):
        torch.library.register_fake(self.qualname, fake, lib=_LIBRARY)
        return fake

    def register_autograd(self, backward, *, setup_context) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context,
                                        lib=_LIBRARY)
        implementation = self.implementation

        # The same formula for the eager path. An old-style forward(ctx, ...): with a separate
        # setup_context, autograd.Function.apply binds the arguments with inspect.signature on
        # every call (~40 us measured).
        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = implementation(*args)
                setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        Eager.__name__ = Eager.__qualname__ = f"{self.name}_backward"
        self._function = Eager


def custom_op(name: str):
    """Decorator: define `protokernels::<name>` from an annotated function (its schema is
    inferred as torch.library.custom_op infers it; no argument is mutated)."""
    def define(implementation) -> CustomOp:
        return CustomOp(name, implementation)
    return define
