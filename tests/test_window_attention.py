"""WindowAttention2d: identity at creation, a float64 masked-dense reference written from the
definition, timm's Swin block at grids of whole windows, exact locality at any grid size."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from visattn import WindowAttention2d

from .helpers import explicit_attention, masked_dense_attention, randomize


def window_of(i: int, size: int, shift: int) -> int:
    """Which window cell ``i`` of an axis lies in: windows of ``size`` cells, the first one ``shift``
    cells long when ``shift > 0``."""
    if shift == 0:
        return i // size
    return 0 if i < shift else 1 + (i - shift) // size


def window_reference(block: WindowAttention2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 output and weights ``(B, heads, H·W, H·W)`` from the definition: same window on
    both axes, Swin's table at ``(qy - ky + w - 1)·(2w - 1) + qx - kx + w - 1``."""
    height, width = x.shape[-2:]
    w, s = block.window_size, block.shift
    cells = [(i, j) for i in range(height) for j in range(width)]
    allowed = torch.tensor(
        [
            [window_of(i, w, s) == window_of(r, w, s) and window_of(j, w, s) == window_of(c, w, s) for r, c in cells]
            for i, j in cells
        ]
    )
    bias = None
    if block.relative_position_bias_table is not None:
        index = torch.tensor(
            [
                [(i - r + w - 1) % (2 * w - 1) * (2 * w - 1) + (j - c + w - 1) % (2 * w - 1) for r, c in cells]
                for i, j in cells
            ]
        )  # outside a window the offset is masked; the modulo only keeps the index in the table
        bias = block.relative_position_bias_table[index].permute(2, 0, 1)
    return masked_dense_attention(block, x, allowed, bias)


CONFIGS = [
    # (H, W, window_size, shift)
    (1, 1, 7, 0),
    (1, 5, 3, 1),
    (3, 2, 7, 0),
    (3, 2, 2, 1),
    (5, 5, 7, 3),
    (6, 4, 7, 5),
    (9, 9, 7, 3),
    (13, 13, 7, 3),
    (7, 10, 3, 0),
    (8, 12, 4, 2),
    (14, 14, 7, 3),
]


@pytest.mark.parametrize(("height", "width", "window", "shift"), CONFIGS)
@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_matches_the_masked_dense_reference(height, width, window, shift, rel_pos_bias):
    block = WindowAttention2d(8, window, shift, rel_pos_bias, num_heads=2, qk_channels=8, v_channels=6)
    block = randomize(block).double().eval()
    x = torch.randn(2, 8, height, width, dtype=torch.float64)
    expected, _ = window_reference(block, x)
    torch.testing.assert_close(block(x), expected)
    with explicit_attention(block):  # the recording path computes the same
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    ("make", "shapes"),
    [
        (lambda: WindowAttention2d(16), [(2, 16, 7, 11), (1, 16, 1, 1), (1, 16, 2, 30)]),
        (lambda: WindowAttention2d(16, 4, 2, num_heads=2, gate="channel"), [(2, 16, 9, 9), (3, 16, 3, 5)]),
    ],
)
def test_identity_at_creation(make, shapes):
    block = make()
    for mode in ("train", "eval"):
        getattr(block, mode)()
        for shape in shapes:
            x = torch.randn(shape)
            assert torch.equal(block(x), x)


def swin_pair(
    size: tuple[int, int], window: int, shift: int, heads: int
) -> tuple[SwinTransformerBlock, WindowAttention2d]:
    """timm's Swin block and a WindowAttention2d holding its attention weights (``gamma = 1``)."""
    dim = 8 * heads
    swin = SwinTransformerBlock(dim, size, num_heads=heads, window_size=window, shift_size=shift).double().eval()
    torch.nn.init.normal_(swin.attn.relative_position_bias_table, std=0.5)
    block = WindowAttention2d(dim, window, shift, num_heads=heads, qk_channels=dim, v_channels=dim).double().eval()
    q, k, v = swin.attn.qkv.weight.detach().chunk(3)
    q_bias, k_bias, v_bias = swin.attn.qkv.bias.detach().chunk(3)
    with torch.no_grad():
        for conv, weight, bias in ((block.query, q, q_bias), (block.key, k, k_bias), (block.value, v, v_bias)):
            conv.weight.copy_(weight[:, :, None, None])
            conv.bias.copy_(bias)
        block.out.weight.copy_(swin.attn.proj.weight[:, :, None, None])
        block.out.bias.copy_(swin.attn.proj.bias)
        block.relative_position_bias_table.copy_(swin.attn.relative_position_bias_table)
        block.gamma.fill_(1.0)
    return swin, block


@pytest.mark.parametrize(("size", "window", "heads"), [((14, 14), 7, 2), ((8, 12), 4, 3)])
@pytest.mark.parametrize("shifted", [False, True])
def test_equals_timm_swin_attention_at_whole_windows(size, window, heads, shifted):
    """On a grid of whole windows Swin's cyclic shift with its -100 mask cuts each wrapped window
    into exactly our windows (its -100 logits weigh ~e⁻¹⁰⁰, nothing in float64)."""
    shift = window // 2 if shifted else 0
    swin, block = swin_pair(size, window, shift, heads)
    x = torch.randn(2, 8 * heads, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = swin._attn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(block(x) - x, expected)


@pytest.mark.parametrize(
    ("size", "window", "shift"), [((9, 9), 7, 3), ((13, 13), 7, 3), ((5, 8), 7, 0), ((10, 3), 4, 1)]
)
def test_one_cell_changes_exactly_the_cells_of_its_window(size, window, shift):
    block = randomize(WindowAttention2d(8, window, shift, num_heads=2)).double().eval()
    height, width = size
    x = torch.randn(1, 8, height, width, dtype=torch.float64)
    for r, c in [(0, 0), (height - 1, width - 1), (height // 2, width // 3), (min(shift, height - 1), 0)]:
        moved = x.clone()
        moved[0, :, r, c] += 1.0
        changed = (block(moved) != block(x)).any(dim=1)[0]
        expected = torch.tensor(
            [
                [
                    window_of(i, window, shift) == window_of(r, window, shift)
                    and window_of(j, window, shift) == window_of(c, window, shift)
                    for j in range(width)
                ]
                for i in range(height)
            ]
        )
        assert torch.equal(changed, expected), (r, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precisions_follow_the_float64_reference(dtype):
    block = randomize(WindowAttention2d(16, 4, 2, num_heads=2, qk_channels=16, v_channels=16)).eval()
    x = torch.randn(2, 16, 9, 11)
    expected, _ = window_reference(block.double(), x.double())
    out = block.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_autocast_and_channels_last():
    block = randomize(WindowAttention2d(16, 4, 1, num_heads=2)).eval()
    x = torch.randn(2, 16, 9, 7)
    expected = block(x)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    torch.testing.assert_close(out.float(), expected, atol=0.15, rtol=0.05)


def test_clear_errors():
    block = WindowAttention2d(16)
    with pytest.raises(ValueError, match=r"WindowAttention2d was built for C=16.*C=8"):
        block(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="3-D tensor"):
        block(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="window_size=0"):
        WindowAttention2d(16, 0)
    with pytest.raises(ValueError, match=r"shift=7 is not valid: it must be an integer >= 0 and < 7"):
        WindowAttention2d(16, 7, 7)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        WindowAttention2d(16, num_heads=3, qk_channels=8)
    with pytest.raises(ValueError, match="gate must be 'scalar' or 'channel'"):
        WindowAttention2d(16, gate=None)
