"""protokernels: fused CUDA and Triton kernels for prototype-based deep learning.

Every op has three backends (cuda, triton, reference) behind one dispatch; see
`available_backends()` and `use_backend()`.
"""
from ._backend import (BackendStatus, BackendUnavailableError, available_backends,
                       current_backend, use_backend)
from .ops.codebook_lookup import codebook_lookup
from .ops.codebook_stats import codebook_stats
from .ops.codes_cross_entropy import codes_cross_entropy
from .ops.dpnp_loss import dpnp_loss
from .ops.dw_nearest import dw_nearest, dw_quantize
from .ops.glvq_loss import glvq_loss
from .ops.kp_conv import kp_conv1d, kp_conv2d
from .ops.nearest import nearest, nearest_both, nearest_by_label, nearest_k
from .ops.prototype_layer import prototype_layer
from .ops.rslvq_loss import rslvq_loss
from .ops.sinkhorn import SinkhornInfo, sinkhorn, sinkhorn_plan
from .ops.sinkhorn_prototype_loss import sinkhorn_prototype_loss
from .ops.sqdist import sqdist
from . import nn  # noqa: E402  (protokernels.nn, after the ops it wraps)

from ._version import __version__  # noqa: E402

__all__ = ["BackendStatus", "BackendUnavailableError", "available_backends", "codebook_lookup",
           "codebook_stats", "codes_cross_entropy", "current_backend", "dpnp_loss", "dw_nearest",
           "dw_quantize", "glvq_loss", "kp_conv1d", "kp_conv2d", "nearest", "nearest_both", "nearest_by_label",
           "nearest_k", "prototype_layer", "rslvq_loss", "SinkhornInfo", "sinkhorn", "sinkhorn_plan",
           "sinkhorn_prototype_loss", "sqdist",
           "use_backend"]
