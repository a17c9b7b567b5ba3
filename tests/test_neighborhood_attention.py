"""NeighborhoodAttention2d: NATTEN's na2d neighbourhoods (dilated, shifted at the borders) against a
float64 masked-dense reference written from the definition, exact locality, gradcheck."""

from __future__ import annotations

import pytest
import torch

from visattn import NeighborhoodAttention2d

from .helpers import explicit_attention, masked_dense_attention, randomize


def natten_window_start(index: int, length: int, kernel_size: int, dilation: int) -> int:
    """NATTEN's ``get_window_start`` (its CPU reference kernel), transcribed: the first key of the
    window of ``index`` on an axis of ``length >= kernel_size · dilation`` cells."""
    half = kernel_size // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * half * dilation
        return a + imodd - kernel_size * dilation
    return index - half * dilation


def neighbourhood(index: int, length: int, kernel_size: int, dilation: int) -> list[int]:
    """The key coordinates of ``index`` on one axis: NATTEN's window, or the whole residue class of
    ``index`` when the axis is shorter than ``kernel_size · dilation`` and the class has fewer than
    ``kernel_size`` cells."""
    same_class = [p for p in range(length) if p % dilation == index % dilation]
    if len(same_class) < kernel_size:
        return same_class
    if length >= kernel_size * dilation:
        start = natten_window_start(index, length, kernel_size, dilation)
        return [start + n * dilation for n in range(kernel_size)]
    t = same_class.index(index)  # a class of >= k cells on a short axis: NATTEN refuses, the rule is the same
    start = min(max(t - kernel_size // 2, 0), len(same_class) - kernel_size)
    return same_class[start : start + kernel_size]


def sees(block: NeighborhoodAttention2d, size: tuple[int, int], query: tuple[int, int], key: tuple[int, int]) -> bool:
    k, d = block.kernel_size, block.dilation
    return all(key[a] in neighbourhood(query[a], size[a], k, d) for a in (0, 1))


def neighbourhood_reference(block: NeighborhoodAttention2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 output and weights ``(B, heads, H·W, H·W)``: ``rpb[(ky - qy)/d + k - 1, (kx - qx)/d + k - 1]``."""
    size = tuple(x.shape[-2:])
    k, d = block.kernel_size, block.dilation
    cells = [(i, j) for i in range(size[0]) for j in range(size[1])]
    allowed = torch.tensor([[sees(block, size, q, key) for key in cells] for q in cells])
    bias = None
    if block.rpb is not None:
        rows = torch.tensor([[(r - i) // d + k - 1 for r, _ in cells] for i, _ in cells])
        cols = torch.tensor([[(c - j) // d + k - 1 for _, c in cells] for _, j in cells])
        # outside the neighbourhood the logit is masked; the clamp only keeps the index in the table
        bias = block.rpb[:, rows.clamp(0, 2 * k - 2), cols.clamp(0, 2 * k - 2)]
    return masked_dense_attention(block, x, allowed, bias)


SIZES = [(1, 1), (1, 5), (3, 2), (5, 7), (9, 9), (12, 7)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("kernel_size", "dilation"), [(1, 1), (3, 1), (3, 2), (5, 1), (5, 3), (7, 1), (7, 2), (3, 3)])
@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_matches_the_masked_dense_reference(size, kernel_size, dilation, rel_pos_bias):
    block = NeighborhoodAttention2d(8, kernel_size, dilation, rel_pos_bias, num_heads=2, qk_channels=8, v_channels=6)
    block = randomize(block).double().eval()
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    expected, weights = neighbourhood_reference(block, x)
    torch.testing.assert_close(block(x), expected)
    with explicit_attention(block):
        torch.testing.assert_close(block(x), expected)
    if size[0] >= kernel_size * dilation and size[1] >= kernel_size * dilation:
        assert ((weights > 0).sum(-1) == kernel_size**2).all()  # NATTEN's case: always k² keys


@pytest.mark.parametrize(
    ("size", "kernel_size", "dilation"), [((9, 9), 3, 1), ((11, 8), 3, 2), ((7, 13), 5, 3), ((4, 4), 7, 1)]
)
def test_one_cell_changes_exactly_the_queries_that_see_it(size, kernel_size, dilation):
    block = randomize(NeighborhoodAttention2d(8, kernel_size, dilation, num_heads=2)).double().eval()
    x = torch.randn(1, 8, *size, dtype=torch.float64)
    height, width = size
    for cell in [(0, 0), (height - 1, width - 1), (height // 2, width // 2), (1, width - 2)]:
        moved = x.clone()
        moved[0, :, cell[0], cell[1]] += 1.0
        changed = (block(moved) != block(x)).any(dim=1)[0]
        expected = torch.tensor([[sees(block, size, (i, j), cell) for j in range(width)] for i in range(height)])
        assert torch.equal(changed, expected), cell


@pytest.mark.parametrize("dilation", [1, 2])
def test_gradcheck_in_inputs_and_the_bias_table(dilation):
    block = randomize(NeighborhoodAttention2d(4, 3, dilation, num_heads=2, qk_channels=4, v_channels=4)).double()
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    table = block.rpb.detach().clone().requires_grad_(True)

    def run(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, {"rpb": table}, (x,))

    assert torch.autograd.gradcheck(run, (x, table))


@pytest.mark.parametrize(
    ("make", "shapes"),
    [
        (lambda: NeighborhoodAttention2d(16), [(2, 16, 7, 11), (1, 16, 1, 1), (1, 16, 2, 30)]),
        (lambda: NeighborhoodAttention2d(16, 3, 2, num_heads=2, gate="channel"), [(2, 16, 9, 9), (3, 16, 3, 5)]),
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
    block = randomize(NeighborhoodAttention2d(16, 5, 2, num_heads=2, qk_channels=16, v_channels=16)).eval()
    x = torch.randn(2, 16, 11, 9)
    expected, _ = neighbourhood_reference(block.double(), x.double())
    out = block.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_clear_errors():
    block = NeighborhoodAttention2d(16)
    with pytest.raises(ValueError, match=r"NeighborhoodAttention2d was built for C=16.*C=8"):
        block(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="3-D tensor"):
        block(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="kernel_size=4 is not valid: it must be an odd integer >= 1") as error:
        NeighborhoodAttention2d(16, 4)
    assert error.value.argument == "kernel_size"
    with pytest.raises(ValueError, match="kernel_size=0"):
        NeighborhoodAttention2d(16, 0)
    with pytest.raises(ValueError, match="dilation=0"):
        NeighborhoodAttention2d(16, 3, 0)
