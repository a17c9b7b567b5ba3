"""The pointing game's scoring (benchmarks/pointing_game.py) against hand-made cases."""

from __future__ import annotations

import torch

from benchmarks.pointing_game import hits, ink_map


def test_hits_reads_the_maximum_as_x_column_y_row():
    maps = torch.zeros(3, 8, 10)
    maps[0, 2, 7] = 1.0  # row 2, column 7
    maps[1, 7, 2] = 1.0  # the transposed place
    maps[2, 5, 5] = 1.0  # on the exclusive right/bottom edge
    boxes = torch.tensor([[6, 1, 9, 4], [6, 1, 9, 4], [2, 2, 5, 5]])  # (x0, y0, x1, y1)
    assert hits(maps, boxes).tolist() == [True, False, False]


def test_ink_baseline_peaks_on_the_largest_blob():
    raw = torch.zeros(1, 1, 32, 32)
    raw[0, 0, 4:6, 4:6] = 1.0  # a small bright fragment
    raw[0, 0, 20:28, 18:26] = 0.8  # a large, slightly dimmer blob
    peak = ink_map(raw).flatten(1).argmax(1).item()
    y, x = divmod(peak, 32)
    assert 20 <= y < 28 and 18 <= x < 26
