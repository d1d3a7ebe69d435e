"""Input checks shared by the public wrappers: every message names the op, the argument and what came.

Each check runs before anything is launched, so bad input raises ValueError/TypeError here and
never reaches a kernel.
"""
from __future__ import annotations

import math
import weakref

import torch

from ._numerics import FLOAT_DTYPES


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def floating(op: str, **tensors: torch.Tensor) -> None:
    """Each argument is a float16/bfloat16/float32/float64 tensor; all share dtype and device."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor (float16, "
                            f"bfloat16, float32 or float64), got {_describe(t)}")
    (first, a), *rest = tensors.items()
    for name, t in rest:
        if t.device != a.device:
            raise ValueError(f"{op}: arguments '{first}' and '{name}' must be on the same device, "
                             f"got '{first}' on {a.device} and '{name}' on {t.device}")
        if t.dtype != a.dtype:
            raise TypeError(f"{op}: arguments '{first}' and '{name}' must have the same dtype, "
                            f"got '{first}' {a.dtype} and '{name}' {t.dtype}")


def min_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() < rank:
        raise ValueError(f"{op}: argument '{name}' must have at least {rank} dimensions {layout}, "
                         f"got {_describe(t)}")


def batched_rows(op: str, x: torch.Tensor, y: torch.Tensor):
    """Check x (..., N, D) and y (..., M, D) and broadcast their batch dimensions like matmul.

    Returns (batch_shape, x3, y3) with x3 (B, N, D) and y3 (B, M, D): views where possible (a
    broadcast batch dimension becomes a 0 stride, not a copy).
    """
    min_rank(op, "x", x, 2, "(..., N, D)")
    min_rank(op, "y", y, 2, "(..., M, D)")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{op}: the feature size D (last dimension) of 'x' and 'y' must match, "
                         f"got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.dim() == 2 and y.dim() == 2:  # unbatched: one view each (host cost per call counts)
        return torch.Size(), x.unsqueeze(0), y.unsqueeze(0)
    if x.shape[:-2] == y.shape[:-2]:  # the common case, without broadcast_shapes' ~40 us
        batch = x.shape[:-2]
    else:
        try:
            batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
        except RuntimeError:
            raise ValueError(f"{op}: the batch dimensions of 'x' and 'y' must broadcast like "
                             f"torch.matmul, got x {tuple(x.shape)} and y {tuple(y.shape)}") from None
    flat = (math.prod(batch),)
    x3 = x.expand(batch + x.shape[-2:]).reshape(flat + x.shape[-2:])
    y3 = y.expand(batch + y.shape[-2:]).reshape(flat + y.shape[-2:])
    return batch, x3, y3


INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _integer_last(op: str, name: str, t, like_name: str, like: torch.Tensor, last: int,
                  layout: str, shape: str) -> None:
    """t is an integer tensor on `like`'s device whose last dimension is `last`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{op}: argument '{name}' must be an integer tensor {layout}, got "
                        f"{_describe(t)}")
    if t.device != like.device:
        raise ValueError(f"{op}: argument '{name}' must be on the same device as "
                         f"'{like_name}' ({like.device}), got {t.device}")
    if t.dim() < 1 or t.shape[-1] != last:
        raise ValueError(f"{op}: argument '{name}' must have shape {shape}, got {_describe(t)}")


def integer_rows(op: str, name: str, t, like: torch.Tensor, batch: torch.Size, rows: int,
                 layout: str) -> torch.Tensor:
    """An integer tensor of shape (..., rows) on `like`'s device, broadcast to batch + (rows,) and
    returned as int64 (B, rows): per-row indices or labels."""
    _integer_last(op, name, t, "x", like, rows, layout, f"{layout} with last dimension {rows}")
    try:
        expanded = t.expand(batch + (rows,))
    except RuntimeError:
        raise ValueError(f"{op}: the batch dimensions of '{name}' must broadcast to "
                         f"{tuple(batch)}, got {_describe(t)}") from None
    return expanded.reshape(math.prod(batch), rows).to(torch.int64).contiguous()


def _can_read_values() -> bool:
    """Whether checking tensor values (a device sync) is allowed: not while torch.compile traces
    and not while a CUDA graph captures."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# Index tensors this package produced, known to lie in [0, bound) while unmodified:
# id -> (weak reference, version counter at production, bound). Checking them again would cost a
# device sync (0.25 ms per VQ step on the H100, or the whole search's GPU time when it is queued).
_IN_RANGE: dict[int, tuple] = {}


def produced_in_range(t: torch.Tensor, bound: int) -> torch.Tensor:
    """Record that t (fresh from one of this package's searches) holds indices in [0, bound)."""
    if not _can_read_values():  # traced or captured: no check happens there anyway
        return t
    key = id(t)
    _IN_RANGE[key] = (weakref.ref(t, lambda _: _IN_RANGE.pop(key, None)), t._version, bound)
    return t


def _known_in_range(t: torch.Tensor, size: int) -> bool:
    entry = _IN_RANGE.get(id(t))
    return (entry is not None and entry[0]() is t and entry[1] == t._version
            and entry[2] <= size)


def index_range(op: str, name: str, t: torch.Tensor, size: int, what: str) -> None:
    """Every value of t lies in [0, size): one device sync, skipped for indices this package
    produced (unmodified since) and under torch.compile and CUDA graph capture, where reading
    values is impossible; the kernels ignore out-of-range values there."""
    if t.numel() == 0 or not _can_read_values() or _known_in_range(t, size):
        return
    # one kernel writing both bounds into one buffer, then one device sync (a stack of aminmax's
    # two results was a second launch: 61 against 53 us a check on the GPU machine, RESULTS.md
    # "The in-model grid, sixteenth session")
    bounds = t.new_empty(2)
    torch.aminmax(t, out=(bounds[0], bounds[1]))
    low, high = bounds.tolist()
    if low < 0 or high >= size:
        raise ValueError(f"{op}: argument '{name}' must hold {what} in [0, {size}), got values "
                         f"from {low} to {high}")


def _conv_tuple(op: str, name: str, value, spatial: int, minimum: int) -> tuple[int, ...]:
    """An int or a sequence of `spatial` ints, each >= minimum, as a tuple (F.conv2d's arguments)."""
    values = (value,) * spatial if isinstance(value, int) else value
    if (isinstance(value, bool) or not isinstance(values, (tuple, list))
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        raise TypeError(f"{op}: argument '{name}' must be an int or a tuple of {spatial} ints, "
                        f"got {value!r}")
    if len(values) != spatial:
        raise ValueError(f"{op}: argument '{name}' must be an int or a tuple of {spatial} ints, "
                         f"got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{op}: argument '{name}' must be >= {minimum}, got {value!r}")
    return tuple(values)


def conv_windows(op: str, x: torch.Tensor, w: torch.Tensor, stride, padding, dilation,
                 spatial: int, layout: str):
    """Check a convolution's input x (B, C, *size) or unbatched (C, *size), prototypes
    w (P, C, *kernel) and geometry; return (stride, padding, dilation) as tuples."""
    if x.dim() not in (spatial + 1, spatial + 2):
        raise ValueError(f"{op}: argument 'x' must be {spatial + 2}-D {layout} (or "
                         f"{spatial + 1}-D without the batch dimension), got {_describe(x)}")
    if w.dim() != spatial + 2:
        raise ValueError(f"{op}: argument 'w' must be {spatial + 2}-D (P, C, *kernel_size), got "
                         f"{_describe(w)}")
    channels, size = x.shape[-spatial - 1], tuple(x.shape[-spatial:])
    if w.shape[1] != channels:
        raise ValueError(f"{op}: 'w' must have as many channels (dimension 1) as 'x' "
                         f"({channels}), got w {tuple(w.shape)} and x {tuple(x.shape)}")
    kernel = tuple(w.shape[2:])
    if min(kernel) < 1:
        raise ValueError(f"{op}: the kernel size of 'w' must be positive, got w {tuple(w.shape)}")
    stride = _conv_tuple(op, "stride", stride, spatial, 1)
    padding = _conv_tuple(op, "padding", padding, spatial, 0)
    dilation = _conv_tuple(op, "dilation", dilation, spatial, 1)
    for extent, k, pad, dil in zip(size, kernel, padding, dilation):
        if dil * (k - 1) + 1 > extent + 2 * pad:
            raise ValueError(
                f"{op}: the kernel of 'w' {kernel} (dilation {dilation}) is larger than the padded "
                f"input: x {tuple(x.shape)} with padding {padding}")
    return stride, padding, dilation


def codebooks(op: str, books: torch.Tensor) -> tuple[int, int, int]:
    """Codebooks (G, K, Dg) with at least one code each: returns (G, K, Dg)."""
    if books.dim() != 3:
        raise ValueError(f"{op}: argument 'codebooks' must be 3-D (G groups, K codes, Dg features "
                         f"per group), got {_describe(books)}")
    groups, size, depth = books.shape
    if size == 0 and groups > 0:
        raise ValueError(f"{op}: argument 'codebooks' has no codes (K = 0), so there is no "
                         f"nearest code; got {_describe(books)}")
    return groups, size, depth


def grouped_features(op: str, x: torch.Tensor, groups: int, depth: int) -> None:
    """x (..., G*Dg): its last dimension splits into the codebooks' G groups of Dg features."""
    min_rank(op, "x", x, 1, "(..., G*Dg)")
    if x.shape[-1] != groups * depth:
        raise ValueError(f"{op}: the last dimension of 'x' must be G*Dg = {groups}*{depth} = "
                         f"{groups * depth} for codebooks of shape (G, K, Dg) = "
                         f"({groups}, K, {depth}), got x {tuple(x.shape)}")


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """t (..., F) as (N, F), a view where possible (also when F or N is 0)."""
    if t.dim() == 2:  # already rows: no reshape call (host time per op call)
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def code_indices(op: str, name: str, idx, like_name: str, like: torch.Tensor, groups: int,
                 size: int) -> torch.Tensor:
    """Code indices (..., G), integer, on `like`'s device, each in [0, K): returned as int64
    (N, G), contiguous."""
    _integer_last(op, name, idx, like_name, like, groups, "of code indices (..., G)",
                  f"(..., G) with G = {groups}")
    index_range(op, name, idx, size, "code indices")
    return rows_of(idx).to(torch.int64).contiguous()


def matrix(op: str, name: str, t: torch.Tensor, layout: str) -> tuple[int, int]:
    """t is 2-D; returns its shape."""
    if t.dim() != 2:
        raise ValueError(f"{op}: argument '{name}' must be 2-D {layout}, got {_describe(t)}")
    return t.shape[0], t.shape[1]


def positive_number(op: str, name: str, value) -> float:
    """A real number > 0 (and finite), as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: argument '{name}' must be a number, got {type(value).__name__}")
    if not 0 < value < math.inf:
        raise ValueError(f"{op}: argument '{name}' must be a finite number > 0, got {value}")
    return float(value)


def positive_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: argument '{name}' must be >= 1, got {value}")
    return value


def marginal(op: str, name: str, m, like_name: str, like: torch.Tensor, size: int,
             dim: str) -> None:
    """m (size,) floating, on `like`'s device, with no negative entry (a value check: skipped
    under torch.compile and CUDA graph capture)."""
    if not isinstance(m, torch.Tensor) or m.dtype not in FLOAT_DTYPES:
        described = _describe(m) if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got {described}")
    if m.device != like.device:
        raise ValueError(f"{op}: argument '{name}' must be on the same device as '{like_name}' "
                         f"({like.device}), got {m.device}")
    if m.shape != (size,):
        raise ValueError(f"{op}: argument '{name}' must have shape ({size},), the size of "
                         f"'{like_name}' dimension {dim}, got {_describe(m)}")
    if m.numel() and _can_read_values() and bool((m < 0).any()):
        raise ValueError(f"{op}: argument '{name}' must not have negative entries, got minimum "
                         f"{m.min().item()}")


def equal_totals(op: str, r: torch.Tensor | None, c: torch.Tensor | None, sizes) -> None:
    """The marginals carry the same total mass (None: uniform, total 1), to 1e-4 relative or
    the rounding of the coarser dtype (a sum of non-negative entries is off by at most that)."""
    if not _can_read_values() or (r is None and c is None):
        return
    totals = [1.0 if m is None else m.double().sum().item() for m in (r, c)]
    if max(totals) <= 0:
        raise ValueError(f"{op}: the marginals 'r' and 'c' must have a positive total mass, got "
                         f"{max(totals)} (sizes {sizes})")
    rounding = max(torch.finfo(m.dtype).eps for m in (r, c) if m is not None)
    if abs(totals[0] - totals[1]) > max(1e-4, rounding) * max(totals):
        raise ValueError(f"{op}: the marginals 'r' and 'c' must have the same total mass (None "
                         f"counts as uniform with total 1), got r summing to {totals[0]} and c "
                         f"to {totals[1]} (sizes {sizes})")


def settings(owner: str, *, ints=None, positive=None, nonnegative=None) -> None:
    """A module's hyperparameters, each a dict name -> value: `ints` must be ints >= 1,
    `positive` finite numbers > 0, `nonnegative` finite numbers >= 0 (a bool is none of these).
    TypeError for a wrong type, ValueError for a value out of range."""
    for name, value in (ints or {}).items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}: '{name}' must be a positive int, got "
                            f"{type(value).__name__}")
        if value < 1:
            raise ValueError(f"{owner}: '{name}' must be a positive int, got {value!r}")
    for bound, values in ((">", positive or {}), (">=", nonnegative or {})):
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{owner}: '{name}' must be a number, got "
                                f"{type(value).__name__}")
            if not (0 < value if bound == ">" else 0 <= value) or value == math.inf:
                raise ValueError(f"{owner}: '{name}' must be a finite number {bound} 0, got "
                                 f"{value!r}")


def feature_rows(owner: str, name: str, t, dim: int, layout: str) -> None:
    """t is a 2-D floating-point tensor `layout` of `dim` features (a module's input)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 2:
        got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{owner}: '{name}' must be a 2-D floating-point tensor {layout}, got "
                        f"{got}")
    if t.shape[1] != dim:
        raise ValueError(f"{owner}: '{name}' must have {dim} features, got {t.shape[1]}")


def labelled(op: str, x: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
             prototype_labels: torch.Tensor | None, x_name: str = "x") -> None:
    """x (N, D) and prototypes (M, D) floating, with 1-D integer labels of N and M entries (the
    prototype losses' arguments; prototype_labels None where the prototypes are the classes)."""
    for name, t in ((x_name, x), ("prototypes", prototypes)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 2:
            raise TypeError(f"{op}: '{name}' must be a 2-D floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
    named = [("labels", labels, x.shape[0])]
    if prototype_labels is not None:
        named.append(("prototype_labels", prototype_labels, prototypes.shape[0]))
    for name, t, rows in named:
        if (not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex()
                or t.dim() != 1):
            raise TypeError(f"{op}: '{name}' must be a 1-D integer tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape[0] != rows:
            raise ValueError(f"{op}: '{name}' must have {rows} entries, got {t.shape[0]}")
        if t.device != x.device:
            raise ValueError(f"{op}: '{name}' must be on {x_name}'s device ({x.device}), got "
                             f"{t.device}")
    if x.shape[1] != prototypes.shape[1]:
        raise ValueError(f"{op}: '{x_name}' and 'prototypes' must have the same feature size, "
                         f"got {x.shape[1]} and {prototypes.shape[1]}")
