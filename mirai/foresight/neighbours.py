"""Foresight neighbour tables: which teacher row is head k's target at each student position.

Sequence layout (LlamaGen, one class token): student position t = 0 is the class token and
position t >= 1 has just read grid cell g = t - 1 (row r = g // W, column c = g % W) of the
W x W token grid (T = W * W positions in all).

``neighbour_table(W, k, layout, source)`` returns a LongTensor [k, T] whose entry [j, t] is
the row of the teacher tensor that is head j's target at student position t, or -1 for "no
target" (the loss masks it out). Teacher rows depend on the source:

* ``source="ema"``: the teacher is the EMA of the AR model's first layers run on the same
  sequence, so its rows are sequence positions: cell g' lives at row g' + 1, and the last cell
  (g' = T - 1) is never read by the sequence, so it has no row (-1). The class position is
  paired with the teacher's class position (row 0) for every head, as the released code does.
* ``source="encoder"``: the teacher is a bidirectional encoder's patch grid, rows are cells
  0 .. T - 1, and the class position has no target.

Layouts (offsets from the read cell g; target cell g'):

* ``"2d"``: the k grid offsets (dr, dc) nearest to (0, 0) in Euclidean distance among those at
  or after g in raster order (dr > 0, or dr == 0 and dc >= 0); ties broken by the raster offset
  dr * W + dc, then by (dr, dc). A target outside the grid is -1, never wrapped.
  k = 3 gives (0, 0), (0, 1), (1, 0): the cell itself, its right and its lower neighbour.
* ``"1d"``: g, g + 1, ..., g + k - 1 in raster order (-1 past the end).
* ``"released"``: the authors' released pairing, raster offsets
  [0, 1, W, W+1, 2, W+2, 2W+2, 2W+1, 2W] taken in raster order with wrap-around across rows
  (only the end of the sequence is cut); head j >= 9 uses raster offset j.

Tables are built in Python on the CPU once (they are tiny: k * T int64) and moved to the device
by the caller (``ForesightObjective`` keeps one as a non-persistent buffer).
"""
from __future__ import annotations

import math

import torch

LAYOUTS = ("2d", "1d", "released")
SOURCES = ("ema", "encoder")


def offsets_2d(k: int, grid_size: int) -> list[tuple[int, int]]:
    """The k nearest forward grid offsets (dr, dc), nearest first (see module docstring)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # Grow a radius R until at least k forward offsets lie within distance R; every offset at
    # distance <= R lies inside the box |dr|, |dc| <= R, so the k nearest (and all their ties)
    # are enumerated exactly.
    radius = max(1, math.isqrt(k) + 1)
    while True:
        cands = [(dr, dc) for dr in range(0, radius + 1) for dc in range(-radius, radius + 1)
                 if (dr > 0 or dc >= 0)]
        within = [o for o in cands if o[0] ** 2 + o[1] ** 2 <= radius ** 2]
        if len(within) >= k:
            break
        radius *= 2
    within.sort(key=lambda o: (o[0] ** 2 + o[1] ** 2, o[0] * grid_size + o[1], o[0], o[1]))
    return within[:k]


def released_offsets(k: int, grid_size: int) -> list[int]:
    """Raster offsets of the released code for heads 0 .. k-1 (W = grid_size)."""
    w = grid_size
    first = [0, 1, w, w + 1, 2, w + 2, 2 * w + 2, 2 * w + 1, 2 * w]
    return [first[j] if j < len(first) else j for j in range(k)]


def target_cells(grid_size: int, k: int, layout: str = "2d") -> torch.Tensor:
    """LongTensor [k, T]: the target grid cell of head j for the cell g = t read at sequence
    position t + 1, indexed by g in 0 .. T-1; -1 where the target falls outside the grid."""
    _check_args(grid_size, k, layout, "ema")
    w = grid_size
    n = w * w
    out = torch.full((k, n), -1, dtype=torch.long)
    if layout == "2d":
        for j, (dr, dc) in enumerate(offsets_2d(k, w)):
            for g in range(n):
                r, c = divmod(g, w)
                rr, cc = r + dr, c + dc
                if 0 <= rr < w and 0 <= cc < w:
                    out[j, g] = rr * w + cc
    else:
        offs = list(range(k)) if layout == "1d" else released_offsets(k, w)
        for j, off in enumerate(offs):
            for g in range(n):
                if g + off < n:
                    out[j, g] = g + off
    return out


def neighbour_table(grid_size: int, k: int, layout: str = "2d", source: str = "ema",
                    input_cells: torch.Tensor | None = None) -> torch.Tensor:
    """LongTensor [k, T] (T = grid_size**2): teacher row of head j's target at student position t,
    or -1 where there is none. See the module docstring for the exact definition.

    ``input_cells`` (LongTensor [T], optional) generalises the raster sequence to any order (PAR):
    the grid cell held as input at each position, -1 for a prefix (class) position; default
    ``t - 1``. Neighbours are always taken on the 2D grid; under ``source="ema"`` cell g' is at the
    position that holds it, and a prefix position is paired with the same teacher position.
    """
    _check_args(grid_size, k, layout, source)
    n = grid_size * grid_size
    cells = target_cells(grid_size, k, layout)          # [k, T] indexed by read cell g
    if input_cells is None:
        input_cells = torch.arange(n) - 1               # raster: position t holds cell t - 1
    input_cells = torch.as_tensor(input_cells, dtype=torch.long).cpu()
    if input_cells.shape != (n,) or int(input_cells.min()) < -1 or int(input_cells.max()) >= n:
        raise ValueError(f"input_cells must be a LongTensor [{n}] of cells in -1 .. {n - 1}")
    held = input_cells >= 0                              # [T] positions that hold a grid cell
    tgt = torch.full((k, n), -1, dtype=torch.long)       # [k, T] target cell per position
    tgt[:, held] = cells[:, input_cells[held]]
    if source == "encoder":
        return tgt                                       # encoder rows are cells; prefix: no target
    row_of_cell = torch.full((n,), -1, dtype=torch.long)  # [T] teacher row holding each cell (-1: none)
    row_of_cell[input_cells[held]] = torch.nonzero(held).flatten()
    table = torch.where(tgt >= 0, row_of_cell[tgt.clamp(min=0)], torch.full_like(tgt, -1))
    table[:, ~held] = torch.nonzero(~held).flatten()     # prefix position <-> the teacher's own prefix row
    return table


def _check_args(grid_size: int, k: int, layout: str, source: str) -> None:
    if not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of foresight heads) must be a positive int, got {k!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
