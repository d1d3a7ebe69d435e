"""Scratch-memory budget of the reference backend: it works in tiles so that its temporaries never
exceed a bound (PROTOKERNELS_REFERENCE_SCRATCH_MB, default 256 MiB), whatever N and M are."""
from __future__ import annotations

import os


def budget_bytes() -> int:
    return int(float(os.environ.get("PROTOKERNELS_REFERENCE_SCRATCH_MB", "256")) * 2**20)


def tile_sizes(sizes: dict[str, int], scratch_bytes, budget: int | None = None) -> dict[str, int]:
    """Largest tile of `sizes` (name -> extent) whose scratch_bytes(**tile) fits the budget.

    Halves the largest extent until it fits (a 1-element tile is always accepted).
    """
    budget = budget_bytes() if budget is None else budget
    tile = {name: max(extent, 1) for name, extent in sizes.items()}
    while scratch_bytes(**tile) > budget and any(v > 1 for v in tile.values()):
        largest = max(tile, key=tile.get)
        tile[largest] = (tile[largest] + 1) // 2
    return tile


def ranges(extent: int, step: int):
    """(start, stop) pairs covering range(extent) in steps."""
    return [(start, min(start + step, extent)) for start in range(0, extent, step)]
