"""VectorQuantizer: (depthwise) vector quantization with a straight-through estimator, VQ-VAE's
losses, EMA codebooks and k-means initialization (VQ-VAE eq. 2-4 and its EMA appendix;
depthwise-vector-quantization..., §3), on the fused ops dw_quantize (dw_nearest and
codebook_lookup in one call), codebook_stats: no (N, K) distance matrix, no one-hot matrix.

A batch holding NaN or infinity never reaches the codebook: its statistics are dropped on the
device (no sync), the codebook and EMA state keep their values, and a warning follows at the next
training call (read without stalling the GPU); its loss is NaN, as the input is. The codebook
loss (ema=False) takes only the finite rows, so no NaN gradient reaches the codes.

When torch.distributed is initialized (world size > 1), every statistic that changes the codebook
(EMA counts and sums, k-means steps, the samples that replace dead codes) is all-reduced or
broadcast, with shapes that do not depend on the local batch, so every rank holds the same
codebook and a rank with an empty or differently sized batch cannot hang the others.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _validate
from .._numerics import FLOAT_DTYPES
from ..ops.codebook_lookup import codebook_lookup, lookup_checked_indices
from ..ops.codebook_stats import stats_of_checked_indices
from ..ops.dw_nearest import dw_nearest, dw_quantize


class _StraightThrough(torch.autograd.Function):
    """Forwards the quantized vectors and hands their gradient to the inputs unchanged (VQ-VAE's
    straight-through estimator): the output is a view of the quantized vectors, without the
    two temporaries of x + (q - x).detach()."""

    @staticmethod
    def forward(x: Tensor, quantized: Tensor) -> Tensor:
        return quantized

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Vector quantization of `dim`-sized features into `groups` slices of dim / groups features,
    each quantized with its own codebook of `codebook_size` codes (groups = 1: plain VQ).

    forward(x) -> (quantized, indices, loss). x is (..., dim) (channel_last, e.g. (B, N, dim)) or
    (B, dim, ...) (channel_last=False, e.g. (B, dim, H, W)); quantized has x's shape and dtype and
    passes its gradient to x unchanged (straight-through); indices is (..., groups) without the
    channel dimension, e.g. (B, H, W, groups); loss = commitment_weight * ||x - sg(q)||^2 (mean)
    plus, without EMA, the codebook loss ||sg(x) - q||^2.

    ema=True: the codebook is a buffer updated in training by exponential moving averages of the
    per-code counts and sums (`decay`, Laplace smoothing with `eps`), from codebook_stats.
    kmeans_init: the first training batch initializes the codebook by `kmeans_iters` k-means
    steps (fused search and statistics). dead_code_threshold > 0: codes whose EMA count falls below
    it are replaced by random vectors of the batch. `usage` and `perplexity` describe the last
    training batch. `deterministic` (None: torch.are_deterministic_algorithms_enabled()) makes the
    statistics and the codebook gradient bitwise reproducible; `precision` is the search's.
    """

    def __init__(self, dim: int, codebook_size: int, groups: int = 1, *,
                 commitment_weight: float = 0.25, ema: bool = True, decay: float = 0.99,
                 eps: float = 1e-5, kmeans_init: bool = False, kmeans_iters: int = 10,
                 dead_code_threshold: float = 0.0, channel_last: bool = True,
                 deterministic: bool | None = None, precision: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        _validate.settings("VectorQuantizer", ints=dict(dim=dim, codebook_size=codebook_size,
                                                       groups=groups, kmeans_iters=kmeans_iters),
                           positive=dict(eps=eps),
                           nonnegative=dict(commitment_weight=commitment_weight,
                                            dead_code_threshold=dead_code_threshold))
        if dim % groups:
            raise ValueError(f"VectorQuantizer: 'dim' ({dim}) must be divisible by 'groups' "
                             f"({groups})")
        _validate.settings("VectorQuantizer", nonnegative=dict(decay=decay))
        if decay >= 1:
            raise ValueError(f"VectorQuantizer: 'decay' must be in [0, 1), got {decay}")
        self.dim, self.codebook_size, self.groups = dim, codebook_size, groups
        self.commitment_weight, self.ema, self.decay, self.eps = commitment_weight, ema, decay, eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold, self.channel_last = dead_code_threshold, channel_last
        self.deterministic, self.precision = deterministic, precision
        factory = dict(device=device, dtype=dtype)
        codebook = torch.empty(groups, codebook_size, dim // groups, **factory)
        if ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_count", torch.ones(groups, codebook_size, device=device,
                                                         dtype=torch.float32))
            self.register_buffer("ema_sum", torch.empty(codebook.shape, device=device,
                                                        dtype=torch.float32))
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("initialized", torch.tensor(not kmeans_init, device=device))
        self.register_buffer("last_counts", torch.zeros(groups, codebook_size, device=device,
                                                        dtype=torch.int64), persistent=False)
        self._needs_init = kmeans_init  # mirrors `initialized` without a device sync per call
        self._needs_sync = True  # ranks may have drawn different codebooks: rank 0's wins
        self._skipped = None  # (host copy of "the last update was skipped", ready event)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Codes as nn.Linear initializes its weights (uniform, fan-in Dg), as
        vector-quantize-pytorch does."""
        nn.init.kaiming_uniform_(self.codebook.view(-1, self.codebook.shape[-1]), a=math.sqrt(5))
        if self.ema:
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(self.codebook)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._needs_init = not bool(self.initialized)

    # -- statistics shared by every rank -------------------------------------------------------

    def _all_reduce(self, *tensors: Tensor) -> None:
        if _distributed():
            for t in tensors:
                dist.all_reduce(t)

    def _broadcast(self, t: Tensor) -> Tensor:
        if _distributed():
            dist.broadcast(t, src=0)
        return t

    @torch.no_grad()
    def _sync_codebook(self) -> None:
        """Every rank starts from rank 0's codebook (and EMA state)."""
        if _distributed():
            for t in (self.codebook, *((self.ema_count, self.ema_sum) if self.ema else ())):
                self._broadcast(t.detach())  # in place: detach() shares the storage
        self._needs_sync = False

    def _stats(self, flat: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        # idx comes from dw_nearest: valid by construction, no range check (a device sync).
        counts, sums = stats_of_checked_indices(flat, idx, self.codebook_size, self.deterministic)
        self._all_reduce(counts, sums)
        return counts, sums

    def _samples(self, flat: Tensor) -> Tensor:
        """codebook_size random rows of the batch per group (G, K, Dg), the same on every rank
        (rank 0's); the current codes where the local batch is empty."""
        grouped = flat.view(-1, self.groups, self.codebook.shape[-1])
        if grouped.shape[0] == 0:
            samples = self.codebook.detach().clone()
        else:
            pick = torch.randint(grouped.shape[0], (self.groups, self.codebook_size),
                                 device=flat.device)
            samples = grouped[pick, torch.arange(self.groups, device=flat.device)[:, None]]
        return self._broadcast(samples.to(self.codebook.dtype).contiguous())

    # -- training-time codebook updates --------------------------------------------------------

    @torch.no_grad()
    def _kmeans(self, flat: Tensor) -> None:
        """k-means (Lloyd) on the batch from random batch vectors; codes left empty keep their
        place. Sets the EMA state to the final clusters. A batch holding NaN or infinity is no
        data to start from: the initialization waits for the next batch (one device sync, on
        this first batch only)."""
        bad = (~torch.isfinite(flat)).any().to(torch.int64)
        self._all_reduce(bad)
        if bad.item():
            warnings.warn("VectorQuantizer: the first training batch held NaN or infinity; the "
                          "k-means initialization waits for the next batch", RuntimeWarning,
                          stacklevel=4)
            return
        centers = self._samples(flat)
        counts = torch.zeros(self.codebook.shape[:2], dtype=torch.int64, device=flat.device)
        for _ in range(self.kmeans_iters):
            _, idx = dw_nearest(flat, centers, precision=self.precision)
            counts, sums = self._stats(flat, idx)
            filled = counts > 0
            means = sums / counts.clamp_min(1)[..., None]
            centers = torch.where(filled[..., None], means.to(centers.dtype), centers)
        self.codebook.copy_(centers)
        if self.ema:
            self.ema_count.copy_(counts.clamp_min(1))
            self.ema_sum.copy_(centers * self.ema_count[..., None])
        self.initialized.fill_(True)
        self._needs_init = False

    @torch.no_grad()
    def _ema_update(self, counts: Tensor, sums: Tensor, usable: Tensor) -> None:
        """The EMA step, applied on the device only where `usable` (the batch was finite and
        non-empty over all ranks): otherwise the state keeps its values (with decay 0, an empty
        batch would zero every count and divide by it)."""
        count = self.ema_count.lerp(counts.to(self.ema_count.dtype), 1.0 - self.decay)
        total_sum = self.ema_sum.lerp(sums.to(self.ema_sum.dtype), 1.0 - self.decay)
        # Laplace smoothing: no code's count is ever 0, so no division blows up.
        total = count.sum(-1, keepdim=True)
        smoothed = (count + self.eps) / (total + self.codebook_size * self.eps) * total
        self.ema_count.copy_(torch.where(usable, count, self.ema_count))
        self.ema_sum.copy_(torch.where(usable, total_sum, self.ema_sum))
        self.codebook.copy_(torch.where(usable, total_sum / smoothed[..., None], self.codebook))

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor, usable: Tensor) -> None:
        """Replace the codes whose EMA count (or, without EMA, batch count) is below the
        threshold by random batch vectors (only from a usable batch: finite, non-empty). As in
        vector-quantize-pytorch, a restarted code starts with the threshold as its EMA count
        (and sample * threshold as its EMA sum), so that it is not dead again at once."""
        usage = self.ema_count if self.ema else self.last_counts
        dead = (usage < self.dead_code_threshold) & usable
        samples = self._samples(flat)
        self.codebook.copy_(torch.where(dead[..., None], samples, self.codebook))
        if self.ema:
            self.ema_count.masked_fill_(dead, self.dead_code_threshold)
            self.ema_sum.copy_(torch.where(
                dead[..., None], samples.to(self.ema_sum.dtype) * self.dead_code_threshold,
                self.ema_sum))

    # -- forward ---------------------------------------------------------------------------------

    def _features_last(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"VectorQuantizer: 'x' must be a torch.Tensor, got "
                            f"{type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"VectorQuantizer: 'x' must be a floating-point tensor (float16, "
                            f"bfloat16, float32 or float64), got {x.dtype}")
        if x.dim() < 1 or (not self.channel_last and x.dim() < 2):
            raise ValueError(f"VectorQuantizer: 'x' must be (..., dim) or, with "
                             f"channel_last=False, (B, dim, ...), got shape {tuple(x.shape)}")
        x = x if self.channel_last else x.movedim(1, -1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: 'x' must have dim = {self.dim} features in "
                             f"dimension {-1 if self.channel_last else 1}, got shape "
                             f"{tuple(x.shape)}")
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self._features_last(x)
        # The codebook's dtype throughout (autocast hands in half-precision activations).
        flat = features.reshape(-1, self.dim).to(self.codebook.dtype)
        if self.training and self._needs_sync:
            self._sync_codebook()
        if self.training and self._needs_init:
            self._kmeans(flat.detach())
        # The search sees a detached codebook: its distances carry the commitment gradient to x.
        # In training it is a snapshot (G*K*Dg elements), which the backward needs after the
        # updates below have changed the codebook in place.
        codes = self.codebook.detach()
        codes = codes.clone() if self.training else codes
        if self.ema:  # no gradient reaches the codebook: the search writes the codes out too
            quantized, idx, dist = dw_quantize(flat, codes, precision=self.precision)
        else:
            dist, idx = dw_nearest(flat, codes, precision=self.precision)
            quantized = lookup_checked_indices(idx, self.codebook, self.deterministic)
        loss = self.commitment_weight * dist.sum() / max(flat.numel(), 1)
        if not self.ema:  # the codebook loss moves the chosen codes towards their (finite) vectors
            # A non-finite row's target is its own code (error 0, gradient 0; masking the squared
            # error instead would still pass 0 * NaN = NaN back).
            finite_rows = torch.isfinite(flat.detach()).all(-1, keepdim=True)
            target = torch.where(finite_rows, flat.detach(), quantized.detach())
            loss = loss + (quantized - target).square().sum() / max(flat.numel(), 1)
        if self.training:
            self._warn_if_skipped()
            self._update(flat.detach(), idx)
        out = _StraightThrough.apply(flat, quantized).to(x.dtype).view(features.shape)
        indices = idx.view(features.shape[:-1] + (self.groups,))
        return (out if self.channel_last else out.movedim(-1, 1)), indices, loss

    @torch.no_grad()
    def _update(self, flat: Tensor, idx: Tensor) -> None:
        # Whether this batch may change the codebook: finite (on every rank) and, for EMA, not
        # empty over all ranks. Decided on the device: no sync per training step.
        bad = (~torch.isfinite(flat)).any().to(torch.int64)
        if self.ema:
            counts, sums = self._stats(flat, idx)
            self._all_reduce(bad)
            usable = (bad == 0) & (counts.sum() > 0)
            self._ema_update(counts, sums, usable)
        else:
            offsets = torch.arange(self.groups, device=idx.device)[:, None] * self.codebook_size
            counts = torch.bincount((idx.t() + offsets).flatten(),
                                    minlength=self.groups * self.codebook_size)
            counts = counts.view(self.groups, self.codebook_size)
            self._all_reduce(counts, bad)
            usable = bad == 0
        self.last_counts.copy_(counts)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat, usable)
        self._note_skipped(bad)

    def _note_skipped(self, bad: Tensor) -> None:
        """Keep a host copy of whether this batch was dropped, to warn at the next call."""
        if bad.device.type == "cuda":
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._skipped = (host, event)
        else:
            self._skipped = (bad, None)

    def _warn_if_skipped(self) -> None:
        if self._skipped is None:
            return
        host, event = self._skipped
        if event is not None and not event.query():  # not known yet: ask again next time
            return
        self._skipped = None
        if host.item():
            warnings.warn("VectorQuantizer: a training batch held NaN or infinity; its "
                          "codebook update was skipped (the codebook and EMA state are "
                          "unchanged)", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The quantized vectors of `indices` (..., groups) as forward returns them:
        (..., dim), or (B, dim, ...) with channel_last=False."""
        codes = codebook_lookup(indices, self.codebook)
        return codes if self.channel_last else codes.movedim(-1, 1)

    @property
    def usage(self) -> Tensor:
        """Fraction of codes chosen at least once in the last training batch, per group (G,)."""
        return (self.last_counts > 0).float().mean(-1)

    @property
    def perplexity(self) -> Tensor:
        """exp(entropy) of the code distribution of the last training batch, per group (G,):
        1 when one code takes everything, codebook_size when all are used equally."""
        p = self.last_counts.float() / self.last_counts.sum(-1, keepdim=True).clamp_min(1)
        return torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1))

    def extra_repr(self) -> str:
        text = f"{self.dim}, {self.codebook_size}, groups={self.groups}"
        text += f", commitment_weight={self.commitment_weight}, ema={self.ema}"
        if self.ema:
            text += f", decay={self.decay}"
        if self.kmeans_init:
            text += f", kmeans_init=True, kmeans_iters={self.kmeans_iters}"
        if self.dead_code_threshold > 0:
            text += f", dead_code_threshold={self.dead_code_threshold}"
        if not self.channel_last:
            text += ", channel_last=False"
        return text
