"""HaloAttention2d: timm's HaloAttn at whole blocks ("zero" border), a float64 masked-dense
reference written from the definition at any grid size (both borders), exact locality, gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers.halo_attn import HaloAttn

from visattn import HaloAttention2d

from .helpers import (
    conv1x1,
    explicit_attention,
    masked_dense_attention,
    randomize,
)


def window_rows(i: int, block: int, halo: int) -> range:
    """The key coordinates of the window of the block holding ``i`` (outside the axis included)."""
    start = i // block * block
    return range(start - halo, start + block + halo)


def halo_reference(block: HaloAttention2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 output and weights over a key canvas: the grid with ``h`` zero cells on top and
    left and ``h`` plus the rest of a whole block on the bottom and right (``(B, heads, H·W, Nk)``).
    "masked": only cells of the picture are keys; "zero": every cell of the window is."""
    height, width = x.shape[-2:]
    b, h = block.block_size, block.halo_size
    bottom, right = h + (-height) % b, h + (-width) % b
    rows, cols = range(-h, height + bottom), range(-h, width + right)  # canvas cells, in grid coordinates
    keys = [(r, c) for r in rows for c in cols]
    cells = [(i, j) for i in range(height) for j in range(width)]

    def sees(i: int, j: int, r: int, c: int) -> bool:
        inside = 0 <= r < height and 0 <= c < width
        return r in window_rows(i, b, h) and c in window_rows(j, b, h) and (inside or block.border == "zero")

    allowed = torch.tensor([[sees(i, j, r, c) for r, c in keys] for i, j in cells])
    bias = None
    if block.pos_embed is not None:
        span = 2 * (b + 2 * h) - 1
        shift = h + b + 2 * h - 1
        q = conv1x1(x, block.query).reshape(x.shape[0], block.num_heads, -1, height * width)
        along_rows = torch.einsum("bhdq,pd->bhqp", q, block.pos_embed.height_rel)
        along_cols = torch.einsum("bhdq,pd->bhqp", q, block.pos_embed.width_rel)
        # outside the window the logit is masked; the clamp only keeps the index in the table
        row_index = torch.tensor([[min(max(r - i + shift, 0), span - 1) for r, _ in keys] for i, _ in cells])
        col_index = torch.tensor([[min(max(c - j + shift, 0), span - 1) for _, c in keys] for _, j in cells])
        expand = (*along_rows.shape[:2], *row_index.shape)
        bias = along_rows.gather(-1, row_index.expand(expand)) + along_cols.gather(-1, col_index.expand(expand))
    return masked_dense_attention(block, x, allowed, bias, pad=(h, bottom, h, right))


@pytest.mark.parametrize(
    ("size", "block_size", "halo"),
    [((1, 1), 2, 1), ((3, 5), 2, 1), ((7, 9), 4, 2), ((9, 9), 8, 3), ((5, 6), 3, 0), ((16, 16), 8, 3)],
)
@pytest.mark.parametrize("border", ["masked", "zero"])
@pytest.mark.parametrize("rel_pos", [True, False])
def test_matches_the_masked_dense_reference(size, block_size, halo, border, rel_pos):
    block = HaloAttention2d(8, block_size, halo, border, rel_pos, num_heads=2, qk_channels=8, v_channels=6)
    block = randomize(block).double().eval()
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    expected, _ = halo_reference(block, x)
    torch.testing.assert_close(block(x), expected)
    with explicit_attention(block):
        torch.testing.assert_close(block(x), expected)


def timm_pair(block_size: int, halo: int, heads: int) -> tuple[HaloAttn, HaloAttention2d]:
    """timm's HaloAttn and a HaloAttention2d with its weights: ``query`` ← ``q``, ``key``/``value``
    ← each head's channels of ``kv``, the relative tables copied, ``out`` the identity, ``γ = 1``."""
    dim = 8 * heads
    timm_attn = HaloAttn(dim, num_heads=heads, block_size=block_size, halo_size=halo, qkv_bias=True).double().eval()
    with torch.no_grad():
        timm_attn.kv.bias.normal_()
        timm_attn.q.bias.normal_()
    d_qk, d_v = timm_attn.dim_head_qk, timm_attn.dim_head_v
    block = HaloAttention2d(dim, block_size, halo, "zero", num_heads=heads, qk_channels=heads * d_qk, v_channels=dim)
    block = block.double().eval()
    kv_weight = timm_attn.kv.weight.detach().unflatten(0, (heads, d_qk + d_v))
    kv_bias = timm_attn.kv.bias.detach().unflatten(0, (heads, d_qk + d_v))
    with torch.no_grad():
        block.query.weight.copy_(timm_attn.q.weight)
        block.query.bias.copy_(timm_attn.q.bias)
        block.key.weight.copy_(kv_weight[:, :d_qk].flatten(0, 1))
        block.key.bias.copy_(kv_bias[:, :d_qk].flatten())
        block.value.weight.copy_(kv_weight[:, d_qk:].flatten(0, 1))
        block.value.bias.copy_(kv_bias[:, d_qk:].flatten())
        block.pos_embed.load_state_dict(timm_attn.pos_embed.state_dict())
        block.out.weight.copy_(torch.eye(dim)[:, :, None, None])
        block.out.bias.zero_()
        block.gamma.fill_(1.0)
    return timm_attn, block


@pytest.mark.parametrize(
    ("size", "block_size", "halo", "heads"), [((16, 16), 8, 3, 2), ((8, 16), 4, 2, 1), ((8, 12), 4, 2, 4)]
)
def test_zero_border_equals_timm_halo_attn(size, block_size, halo, heads):
    timm_attn, block = timm_pair(block_size, halo, heads)
    x = torch.randn(2, 8 * heads, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x) - x, timm_attn(x))


@pytest.mark.parametrize("border", ["masked", "zero"])
@pytest.mark.parametrize(("size", "block_size", "halo"), [((9, 9), 4, 2), ((7, 10), 3, 1), ((4, 4), 8, 3)])
def test_one_cell_changes_exactly_the_blocks_whose_window_holds_it(size, block_size, halo, border):
    block = randomize(HaloAttention2d(8, block_size, halo, border, num_heads=2)).double().eval()
    height, width = size
    x = torch.randn(1, 8, height, width, dtype=torch.float64)
    for r, c in [(0, 0), (height - 1, width - 1), (height // 2, width // 2), (block_size % height, 0)]:
        moved = x.clone()
        moved[0, :, r, c] += 1.0
        changed = (block(moved) != block(x)).any(dim=1)[0]
        expected = torch.tensor(
            [
                [r in window_rows(i, block_size, halo) and c in window_rows(j, block_size, halo) for j in range(width)]
                for i in range(height)
            ]
        )
        assert torch.equal(changed, expected), (r, c)


@pytest.mark.parametrize("border", ["masked", "zero"])
def test_gradcheck_in_inputs_and_the_relative_tables(border):
    block = randomize(HaloAttention2d(4, 2, 1, border, num_heads=2, qk_channels=4, v_channels=4)).double()
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    tables = [t.detach().clone().requires_grad_(True) for t in (block.pos_embed.height_rel, block.pos_embed.width_rel)]

    def run(x: torch.Tensor, height_rel: torch.Tensor, width_rel: torch.Tensor) -> torch.Tensor:
        params = {"pos_embed.height_rel": height_rel, "pos_embed.width_rel": width_rel}
        return torch.func.functional_call(block, params, (x,))

    assert torch.autograd.gradcheck(run, (x, *tables))


@pytest.mark.parametrize(
    ("make", "shapes"),
    [
        (lambda: HaloAttention2d(16), [(2, 16, 7, 11), (1, 16, 1, 1), (1, 16, 2, 30)]),
        (lambda: HaloAttention2d(16, 4, 2, "zero", num_heads=2, gate="channel"), [(2, 16, 9, 9), (3, 16, 8, 8)]),
    ],
)
def test_identity_at_creation(make, shapes):
    block = make()
    for mode in ("train", "eval"):
        getattr(block, mode)()
        for shape in shapes:
            x = torch.randn(shape)
            assert torch.equal(block(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precisions_follow_the_float64_reference(dtype):
    block = randomize(HaloAttention2d(16, 4, 2, num_heads=2, qk_channels=16, v_channels=16)).eval()
    with torch.no_grad():  # logits of a moderate size, so bf16's rounding stays within the tolerance
        for table in (block.pos_embed.height_rel, block.pos_embed.width_rel):
            table.mul_(1 / math.sqrt(8))
    x = torch.randn(2, 16, 9, 11)
    expected, _ = halo_reference(block.double(), x.double())
    out = block.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_clear_errors():
    block = HaloAttention2d(16)
    with pytest.raises(ValueError, match=r"HaloAttention2d was built for C=16.*C=8"):
        block(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="3-D tensor"):
        block(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="block_size=0"):
        HaloAttention2d(16, 0)
    with pytest.raises(ValueError, match="halo_size=-1"):
        HaloAttention2d(16, 4, -1)
    with pytest.raises(ValueError, match="border must be 'masked' or 'zero'"):
        HaloAttention2d(16, border="reflect")
