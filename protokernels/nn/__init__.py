"""protokernels.nn: thin, conventional modules over the fused ops."""
from .kp_conv import KernelPrototypeConv2d
from .vector_quantizer import VectorQuantizer

__all__ = ["KernelPrototypeConv2d", "VectorQuantizer"]
