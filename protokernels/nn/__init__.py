"""protokernels.nn: thin, conventional modules over the fused ops: the kernel-prototype
convolution layer, vector quantization, and the prototype heads and losses of the papers (GLVQ,
RSLVQ, DPNP, the case-based prototype layer, ProtoPNet-style patch prototypes, Sinkhorn-balanced
prototypes)."""
from .dpnp import DPNPLoss
from .kp_conv import KernelPrototypeConv2d
from .lvq import GLVQLoss, PrototypeClassifier, RSLVQLoss
from .patch_prototypes import PatchPrototypes
from .prototype_layer import CaseBasedLoss, PrototypeLayer
from .sinkhorn_prototypes import SinkhornPrototypes
from .vector_quantizer import VectorQuantizer

__all__ = ["CaseBasedLoss", "DPNPLoss", "GLVQLoss", "KernelPrototypeConv2d", "PatchPrototypes",
           "PrototypeClassifier", "PrototypeLayer", "RSLVQLoss", "SinkhornPrototypes",
           "VectorQuantizer"]
