"""What an (op, backend) pair can take: dtypes and limits, declared beside the kernels
(`CAPABILITIES` in triton_kernels/<op>.py, `<op>_cuda_capabilities()` in csrc/<op>.cu; the
reference takes everything) and read by dispatch: `auto` skips a backend that cannot take an
input, an explicitly requested one raises with the reasons (`not_supported_reasons`, as in
xformers' dispatch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._numerics import FLOAT_DTYPES

_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


@dataclass(frozen=True)
class Capabilities:
    """dtypes: the floating dtypes taken; max_rows: the most rows (N or M) an index can address
    (packed 31-bit indices); max_k: the most neighbours per row; why: what the limits come from,
    for the error messages. hopper_depth_bytes (CUDA's sqdist forward and nearest family): at
    "tf32" or in half precision, the op's Hopper (sm_90a) kernel runs on this GPU for rows of up
    to this many bytes (the search: one best per row); hopper_split_depth_bytes: the same at
    "tf32x3" (split TF32 products take room for y's low parts); 0 where it does not run.
    hopper_kernels: the computations of the op file with a Hopper kernel on this GPU (e.g.
    "kp_conv2d_grad_weight"), whose conditions the `auto` table knows. Not limits: other inputs
    take another kernel."""
    dtypes: tuple = FLOAT_DTYPES
    max_rows: int | None = None
    max_k: int | None = None
    why: str = ""
    hopper_depth_bytes: int = 0
    hopper_split_depth_bytes: int = 0
    hopper_kernels: tuple = ()

    def hopper_depth(self, dtype: torch.dtype, precision: str) -> int:
        """The deepest rows (bytes) the Hopper kernel takes at this dtype and precision; 0: none
        (float32 "ieee" is FFMA's)."""
        if dtype == torch.float32:
            return {"tf32": self.hopper_depth_bytes,
                    "tf32x3": self.hopper_split_depth_bytes}.get(precision, 0)
        return self.hopper_depth_bytes if dtype in (torch.float16, torch.bfloat16) else 0

    def not_supported_reasons(self, dtype: torch.dtype, rows: int = 0, k: int = 1) -> list[str]:
        reasons = []
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} is not supported "
                           f"(takes {names})")
        if self.max_rows is not None and rows > self.max_rows:
            reasons.append(f"{rows} rows is above its limit of {self.max_rows}")
        if self.max_k is not None and k > self.max_k:
            reasons.append(f"k = {k} is above its limit of {self.max_k}")
        if reasons and self.why:
            reasons[-1] += f" ({self.why})"
        return reasons

    def describe(self) -> str:
        parts = ["dtypes " + "/".join(str(d).removeprefix("torch.") for d in self.dtypes)]
        if self.max_rows is not None:
            parts.append(f"rows <= {self.max_rows}")
        if self.max_k is not None:
            parts.append(f"k <= {self.max_k}")
        if self.hopper_depth_bytes:
            parts.append(f"Hopper kernel for rows <= {self.hopper_depth_bytes} bytes (tf32, half), "
                         f"<= {self.hopper_split_depth_bytes} (tf32x3)")
        if self.hopper_kernels:
            parts.append("Hopper kernels: " + ", ".join(self.hopper_kernels))
        return ", ".join(parts)

    @classmethod
    def parse(cls, text: str) -> Capabilities:
        """From the extension's declaration, e.g. "dtypes=float16,bfloat16,float32;max_rows=
        2147483647;max_k=64;why=..." (why last: it may hold ';'). An empty text takes
        everything."""
        text, _, why = text.partition("why=")
        fields = dict(item.split("=", 1) for item in text.split(";") if item)
        fields["why"] = why
        return cls(
            dtypes=tuple(_DTYPE_NAMES[d] for d in fields["dtypes"].split(","))
            if "dtypes" in fields else FLOAT_DTYPES,
            max_rows=int(fields["max_rows"]) if "max_rows" in fields else None,
            max_k=int(fields["max_k"]) if "max_k" in fields else None,
            why=fields.get("why", ""),
            hopper_depth_bytes=int(fields.get("hopper_depth_bytes", 0)),
            hopper_split_depth_bytes=int(fields.get("hopper_split_depth_bytes", 0)),
            hopper_kernels=tuple(name for name in fields.get("hopper", "").split(",") if name))


EVERYTHING = Capabilities()
