"""Recording the local families: weights over each query's keys become full rows on the H×W key
grid, equal to the float64 references of the family tests, for all query cells or a subset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visattn import HaloAttention2d, NeighborhoodAttention2d, WindowAttention2d, record_attention
from visattn.explain.maps import compute, query_map, received
from visattn.layers.functional import attention_matrix_bytes

from .helpers import randomize
from .test_halo_attention import halo_reference
from .test_neighborhood_attention import neighbourhood_reference
from .test_window_attention import window_reference

GRID = (9, 7)  # the stem halves an 18×14 image


def halo_rows(block: HaloAttention2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The halo reference with its weights cut from the zero-padded key canvas to the picture."""
    out, weights = halo_reference(block, x)
    height, width = x.shape[-2:]
    h, b = block.halo_size, block.block_size
    canvas = weights.unflatten(-1, (height + 2 * h + (-height) % b, width + 2 * h + (-width) % b))
    return out, canvas[..., h : h + height, h : h + width].flatten(-2)


FAMILIES = {
    "window": (lambda: WindowAttention2d(8, 4, 2, num_heads=2), window_reference),
    "neighborhood": (lambda: NeighborhoodAttention2d(8, 3, 2, num_heads=2), neighbourhood_reference),
    "halo masked": (lambda: HaloAttention2d(8, 4, 1, num_heads=2), halo_rows),
    "halo zero": (lambda: HaloAttention2d(8, 4, 1, "zero", num_heads=2), halo_rows),
}


class TinyNet(nn.Module):
    """A stride-2 stem, a local attention block, a classifier: 18×14 images → a 9×7 grid."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.attn = block
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.stem(x)))


def net_and_reference(name: str) -> tuple[TinyNet, torch.Tensor, torch.Tensor]:
    """A float64 net with the family's block, an input, and the reference weights ``(B, heads, H·W, H·W)``."""
    make, reference = FAMILIES[name]
    net = TinyNet(randomize(make())).double().eval()
    x = torch.randn(2, 3, 18, 14, dtype=torch.float64)
    with torch.no_grad():
        _, weights = reference(net.attn, net.stem(x))
    return net, x, weights


def centre(cell: int) -> tuple[float, float]:
    """The ``(x, y)`` pixel at the centre of grid cell ``cell`` (row-major) of the 18×14 image."""
    row, col = divmod(cell, GRID[1])
    return 2 * col + 1.0, 2 * row + 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_query_maps_of_every_cell_are_the_reference_rows(name):
    net, x, weights = net_and_reference(name)
    with torch.no_grad(), record_attention(net) as rec:
        out = net(x)
    torch.testing.assert_close(out, net(x))  # recording does not change the output
    record = rec["attn"]
    assert record.weights.shape == (2, 2, 63, 63) and record.key_index is None
    assert record.query_grid == record.key_grid == GRID
    torch.testing.assert_close(record.weights, weights)
    for cell in range(63):
        torch.testing.assert_close(query_map(rec, "attn", centre(cell)), weights[:, :, cell].reshape(2, 2, *GRID))
    torch.testing.assert_close(received(rec, "attn"), weights.mean(dim=2).reshape(2, 2, *GRID))
    sums = record.weights.sum(-1)
    if name == "halo zero":  # the zero keys outside the picture take their share
        assert (sums[:, :, 0] < 1 - 1e-3).all() and (sums <= 1 + 1e-12).all()
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("name", FAMILIES)
def test_queries_record_only_the_asked_cells(name):
    net, x, weights = net_and_reference(name)
    cells = [62, 0, 23, 40]
    with torch.no_grad(), record_attention(net, queries=[centre(cell) for cell in cells]) as rec:
        out = net(x)
    torch.testing.assert_close(out, net(x))
    record = rec["attn"]
    assert record.query_index.tolist() == cells
    assert record.weights.shape == (2, 2, 4, 63)
    torch.testing.assert_close(record.weights, weights[:, :, cells])
    for cell in cells:
        torch.testing.assert_close(query_map(rec, "attn", centre(cell)), weights[:, :, cell].reshape(2, 2, *GRID))
    torch.testing.assert_close(received(rec, "attn"), weights[:, :, cells].mean(dim=2).reshape(2, 2, *GRID))
    with pytest.raises(ValueError, match=r"\(row 0, col 1\).*not recorded"):
        query_map(rec, "attn", centre(1))


def test_a_window_map_is_zero_outside_the_window():
    net, x, _ = net_and_reference("window")
    with torch.no_grad(), record_attention(net) as rec:
        net(x)
    query = query_map(rec, "attn", centre(3 * 7 + 4))  # row 3, column 4: the window rows 2-5, columns 2-5
    inside = torch.zeros(*GRID, dtype=torch.bool)
    inside[2:6, 2:6] = True
    assert (query[..., ~inside] == 0).all() and (query[..., inside] > 0).all()


def test_the_memory_limit_counts_full_rows():
    block = WindowAttention2d(8, 3, num_heads=2)
    x = torch.randn(2, 8, 6, 5)
    need = attention_matrix_bytes(2, 2, 30, 30, torch.float32)
    with record_attention(block, max_bytes=need - 1), pytest.raises(ValueError, match=rf"need {need} bytes.*queries="):
        block(x)
    with record_attention(block, queries=[(0, 0), (4, 5)], max_bytes=attention_matrix_bytes(2, 2, 2, 30)) as rec:
        block(x)
    assert rec[""].weights.shape == (2, 2, 2, 30)


@pytest.mark.parametrize("method", ["rollout", "cls", "grad_rollout"])
def test_rollout_style_methods_say_they_need_global_attention(method):
    net, x, _ = net_and_reference("window")
    with pytest.raises(ValueError, match="needs global attention between every pair of tokens.*query_map"):
        compute(net, method, x)
