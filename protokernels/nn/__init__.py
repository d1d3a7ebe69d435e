"""protokernels.nn: thin, conventional modules over the fused ops."""
from .kp_conv import KernelPrototypeConv2d

__all__ = ["KernelPrototypeConv2d"]
