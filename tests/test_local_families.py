"""What the local families share through their kernel: torch.compile(fullgraph=True) and ONNX
export at a fixed grid size, and the tiling's cost."""

from __future__ import annotations

import pytest
import torch

from visattn import HaloAttention2d, NeighborhoodAttention2d, WindowAttention2d
from visattn.layers.local import NeighborhoodAxis, WindowAxis
from visattn.layers.local_kernel import AxisTiles

from .helpers import assert_every_parameter_gets_gradient, randomize

FAMILIES = {
    "window": lambda: WindowAttention2d(16, 4, 2, num_heads=2),
    "neighborhood": lambda: NeighborhoodAttention2d(16, 5, 2, num_heads=2),
    "halo masked": lambda: HaloAttention2d(16, 4, 2, num_heads=2),
    "halo zero": lambda: HaloAttention2d(16, 4, 2, "zero", num_heads=2),
}


def opened(name: str) -> torch.nn.Module:
    return randomize(FAMILIES[name]()).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_every_parameter_once_the_gate_is_open(name):
    """At creation only the gate gets a gradient (the block is x + 0·y); once it is open, all do."""
    block, x = FAMILIES[name](), torch.randn(2, 16, 7, 6)
    block(x).pow(2).sum().backward()
    assert block.gamma.grad.abs().sum() > 0 and block.query.weight.grad.abs().sum() == 0
    with torch.no_grad():
        block.gamma.fill_(0.5)
    block.zero_grad()
    block(x).pow(2).sum().backward()
    assert_every_parameter_gets_gradient(block)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_compiles_as_one_graph_forward_and_backward(name):
    block = opened(name).train()
    x = torch.randn(2, 16, 9, 11)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    block(eager_x).square().sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    compiled(compiled_x).square().sum().backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)
    for p, grad in zip(block.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_exports_to_onnx(name, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    block = opened(name)
    x = torch.randn(1, 16, 9, 11)
    torch.onnx.export(block, (x,), dynamo=True).save(tmp_path / "block.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "block.onnx")
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), block(x), atol=1e-5, rtol=1e-4)


def test_windows_gather_each_key_once():
    """A window is its own tile and region: the regions of one axis hold each cell once."""
    tiles = AxisTiles.of(WindowAxis(4, 2), 11, torch.device("cpu"))
    assert tiles.member.shape == (4, 4, 4)  # windows [0, 2), [2, 6), [6, 10), [10, 11)
    kept = tiles.keys[tiles.keys >= 0]
    assert sorted(kept.tolist()) == list(range(11))


def test_neighbourhood_tiles_stay_in_one_class_and_gather_at_most_2k_keys():
    """Dilation 2, kernel 3, tiles of 4: the classes 0, 2, … and 1, 3, … are tiled apart, and a
    tile's region is the union of its queries' windows (at most 2k = 6 members of its class)."""
    tiles = AxisTiles.of(NeighborhoodAxis(3, 2, tile=4), 13, torch.device("cpu"))
    for queries, keys in zip(tiles.queries.tolist(), tiles.keys.tolist(), strict=True):
        real = [q for q in queries if q < 13]
        assert len({q % 2 for q in real}) == 1 and all(k % 2 == real[0] % 2 for k in keys if k >= 0)
    assert tiles.keys.shape[1] <= 6


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_dropout_acts_in_training_only(name):
    block = randomize(FAMILIES[name]())
    block.attn_drop = 0.5
    x = torch.randn(2, 16, 9, 11)
    evaluated = block.eval()(x)
    torch.testing.assert_close(block(x), evaluated)
    trained = block.train()(x)
    assert trained.shape == x.shape and not torch.allclose(trained, evaluated)
