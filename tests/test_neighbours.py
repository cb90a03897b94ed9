"""Neighbour tables written out by hand for a 4x4 grid, every layout and source.

Grid cells (W = 4):        Student position t has read cell g = t - 1 (t = 0 is the class token).
     0  1  2  3            ema rows:     cell g' -> row g' + 1, cell 15 has no row, class -> row 0.
     4  5  6  7            encoder rows: cell g' -> row g', class -> no target.
     8  9 10 11
    12 13 14 15
"""
import pytest
import torch

from mirai.foresight import neighbour_table, offsets_2d, target_cells
from mirai.foresight.objective import mtp_table

N = -1


def _check(table, expected):
    assert table.dtype == torch.long
    assert table.tolist() == expected


def test_2d_ema_k3_self_right_below():
    _check(neighbour_table(4, 3, "2d", "ema"), [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],      # (0,0): the read cell itself
        [0, 2, 3, 4, N, 6, 7, 8, N, 10, 11, 12, N, 14, 15, N],       # (0,1): right; right border; cell 15 has no row
        [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N, N, N, N],      # (1,0): below; bottom row; cell 15 has no row
    ])


def test_2d_encoder_k3():
    _check(neighbour_table(4, 3, "2d", "encoder"), [
        [N, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [N, 1, 2, 3, N, 5, 6, 7, N, 9, 10, 11, N, 13, 14, 15],       # cell 15 is a valid encoder row
        [N, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N, N, N],
    ])


def test_2d_ema_k5_diagonals_and_left_border():
    t = neighbour_table(4, 5, "2d", "ema")
    assert offsets_2d(5, 4) == [(0, 0), (0, 1), (1, 0), (1, -1), (1, 1)]   # tie at sqrt(2): raster W-1 < W+1
    assert t[3].tolist() == [0, N, 5, 6, 7, N, 9, 10, 11, N, 13, 14, 15, N, N, N]   # below-left: column 0 -> -1, never wrapped
    assert t[4].tolist() == [0, 6, 7, 8, N, 10, 11, 12, N, 14, 15, N, N, N, N, N]   # below-right: cell 15 (t=11) has no row


def test_2d_offsets_order_by_distance_then_raster():
    offs = offsets_2d(9, 16)
    assert offs == [(0, 0), (0, 1), (1, 0), (1, -1), (1, 1), (0, 2), (2, 0), (1, -2), (1, 2)]
    d = [dr * dr + dc * dc for dr, dc in offsets_2d(40, 16)]
    assert d == sorted(d)
    assert all(dr > 0 or (dr == 0 and dc >= 0) for dr, dc in offsets_2d(40, 16))


def test_1d_ema_and_encoder():
    _check(neighbour_table(4, 3, "1d", "ema"), [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N],      # raster: no border, wraps to the next row
        [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N, N],
    ])
    _check(neighbour_table(4, 3, "1d", "encoder"), [
        [N, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [N, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [N, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N],
    ])


def test_released_ema_offsets_wrap_across_rows():
    # released raster offsets for W = 4: [0, 1, 4, 5, 2, 6, 10, 9, 8]
    _check(neighbour_table(4, 4, "released", "ema"), [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N],      # g=3 -> cell 4: wrapped, unlike 2d
        [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N, N, N, N],
        [0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, N, N, N, N, N],      # g=3 -> cell 8 (wrapped diagonal)
    ])


def test_released_encoder_heads_beyond_ninth_use_offset_k():
    t = neighbour_table(4, 10, "released", "encoder")
    assert t[:, 0].tolist() == [N] * 10                               # class: no target under encoder
    assert t[6].tolist() == [N, 10, 11, 12, 13, 14, 15] + [N] * 9     # offset 2W+2 = 10
    assert t[8].tolist() == [N, 8, 9, 10, 11, 12, 13, 14, 15] + [N] * 7   # offset 2W = 8
    assert t[9].tolist() == [N, 9, 10, 11, 12, 13, 14, 15] + [N] * 8   # head 10: raster offset 9


def test_class_row_every_layout():
    for layout in ("2d", "1d", "released"):
        assert neighbour_table(4, 6, layout, "ema")[:, 0].tolist() == [0] * 6
        assert neighbour_table(4, 6, layout, "encoder")[:, 0].tolist() == [N] * 6


def test_ema_never_targets_last_cell_and_rows_in_range():
    for layout in ("2d", "1d", "released"):
        for k in (1, 3, 9, 16):
            e = neighbour_table(5, k, layout, "ema")
            assert e.shape == (k, 25) and e.max() <= 24 and e.min() >= -1
            enc = neighbour_table(5, k, layout, "encoder")
            # the same targets, shifted by one row, except cell 24 which only the encoder has
            shifted = torch.where((enc >= 0) & (enc < 24), enc + 1, torch.full_like(enc, -1))
            assert torch.equal(e[:, 1:], shifted[:, 1:])


def test_released_matches_2d_first_heads_inside_grid():
    # away from the borders, the released raster offsets 0, 1, W equal the 2d offsets (0,0), (0,1), (1,0)
    r = neighbour_table(16, 3, "released", "ema")
    d = neighbour_table(16, 3, "2d", "ema")
    g = 5 * 16 + 7                                                   # an interior cell
    assert torch.equal(r[:, g + 1], d[:, g + 1])


def test_target_cells_and_mtp_table():
    c = target_cells(4, 3, "2d")
    assert c[:, 0].tolist() == [0, 1, 4] and c[:, 15].tolist() == [15, N, N]
    m = mtp_table(4, 2, "1d")                                        # position t: NTP predicts cell t
    assert m.tolist() == [[*range(1, 16), N], [*range(2, 16), N, N]]  # classic MTP: t+1, t+2
    m2 = mtp_table(4, 2, "2d")
    assert m2[:, 0].tolist() == [1, 4] and m2[:, 3].tolist() == [N, 7]


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="k"):
        neighbour_table(4, 0)
    with pytest.raises(ValueError, match="layout"):
        neighbour_table(4, 3, "hex")
    with pytest.raises(ValueError, match="source"):
        neighbour_table(4, 3, "2d", "dino")
    with pytest.raises(ValueError, match="grid_size"):
        neighbour_table(0, 3)


def test_any_sequence_order_via_input_cells():
    # 2x2 grid (cells 0 1 / 2 3); positions hold [class, cell 2, cell 0, cell 1]; cell 3 is never held
    order = torch.tensor([-1, 2, 0, 1])
    _check(neighbour_table(2, 3, "2d", "ema", input_cells=order), [
        [0, 1, 2, 3],          # self: the position holding the same cell
        [0, N, 3, N],          # right: cell 3 has no row; cell 1 is held at position 3
        [0, N, 1, N],          # below: cell 2 is held at position 1
    ])
    _check(neighbour_table(2, 3, "2d", "encoder", input_cells=order), [
        [N, 2, 0, 1],
        [N, 3, 1, N],
        [N, N, 2, 3],
    ])
    raster = torch.arange(16) - 1
    assert torch.equal(neighbour_table(4, 5, "2d", "ema", input_cells=raster), neighbour_table(4, 5, "2d", "ema"))
    with pytest.raises(ValueError, match="input_cells"):
        neighbour_table(2, 1, input_cells=torch.tensor([-1, 0, 4, 1]))
