"""The attention explorer's page data: what the HTML embeds decodes to the weights
``record_attention`` gives (within 1/255 of each map's range), for ViTs with class and register
tokens, mean-pooled ViTs, CNNs with ``SelfAttention2d``, hybrids; the size budget; the CLI.

The oracle is a separate recording of the same model on the same input (``record_attention``
with every query cell, no ``queries=``), and the map functions of ``visattn.explain.maps`` on it; the
page is read back from the HTML text with :func:`read_page_data` and :func:`dequantize`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image
from torch import nn

from visattn import HybridViT, SelfAttention2d, VisionTransformer, WindowAttention2d, record_attention
from visattn.cli import main
from visattn.data_spec import DataSpec
from visattn.explain import explore as explore_module
from visattn.explain import maps
from visattn.explain.explore import dequantize, explore, quantize, read_page_data
from visattn.explain.inputs import Preprocess
from visattn.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RGB_SPEC = DataSpec(img_size=(16, 24), in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3)


def assert_quantized(entry: dict, expected, what: str = "") -> None:
    """Every map of ``entry`` equals ``expected`` ``(..., h, w)`` within half a step of its range."""
    got = dequantize(entry)
    want = np.asarray(expected, dtype=np.float64).reshape(got.shape)
    flat_want = want.reshape(-1, want.shape[-2] * want.shape[-1])
    step = (flat_want.max(axis=1) - flat_want.min(axis=1)) / 255
    error = np.abs(got.reshape(flat_want.shape) - flat_want).max(axis=1)
    assert (error <= step / 2 * (1 + 1e-4) + 1e-7).all(), f"{what}: error {error.max():.3g}, step {step.min():.3g}"


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (90, 40, 3), dtype=np.uint8))
    return [wide, tall]


def small_vit(**kwargs) -> VisionTransformer:
    options = dict(img_size=(16, 24), patch_size=4, num_classes=6, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0)
    return VisionTransformer(**{**options, **kwargs}).eval()


def recorded(model: nn.Module, picture: Image.Image) -> tuple[torch.Tensor, maps.AttentionRecording, torch.Tensor]:
    x = Preprocess.from_spec(RGB_SPEC)(picture)[None]
    with torch.no_grad(), record_attention(model) as rec:
        logits = model(x)
    return x, rec, logits


def with_fused(per_head: torch.Tensor) -> torch.Tensor:
    per_head = per_head.double()
    return torch.cat([per_head, per_head.mean(0, keepdim=True), per_head.amax(0, keepdim=True)])


def test_quantize_keeps_each_map_to_half_a_step_of_its_own_range():
    values = torch.stack([torch.rand(5, 7) * 1e-3, torch.rand(5, 7) + 10.0, torch.full((5, 7), 0.25)])
    entry = quantize(values)
    assert entry["shape"] == [3, 5, 7]
    assert_quantized(entry, values.numpy(), "random maps")
    assert np.array_equal(dequantize(entry)[2], np.full((5, 7), 0.25, dtype=np.float32))  # a constant map


def test_vit_page_holds_the_recorded_weights(tmp_path):
    """Class token and two registers, a 4×6 patch grid, two pictures of other aspect ratios."""
    model = small_vit(reg_tokens=2)
    page = explore(model, pictures(), tmp_path / "vit.html", data_config=RGB_SPEC, class_names=list("abcdef"))
    data = read_page_data(tmp_path / "vit.html")
    assert page.bytes == (tmp_path / "vit.html").stat().st_size and not page.notes
    paths = [f"blocks.{i}.attn" for i in range(3)]
    for picture, image in zip(pictures(), data["images"], strict=True):
        x, rec, logits = recorded(model, picture)
        assert (image["width"], image["height"]) == picture.size and image["input_size"] == [16, 24]
        probs = logits.double().softmax(-1)[0]
        assert [p["label"] for p in image["predictions"]] == ["abcdef"[i] for i in probs.argsort(descending=True)[:5]]
        assert [p["p"] for p in image["predictions"]] == pytest.approx(probs.sort(descending=True).values[:5].tolist())
        assert [layer["path"] for layer in image["layers"]] == paths
        for k, (path, layer) in enumerate(zip(paths, image["layers"], strict=True)):
            assert layer["prefix"] == ["class token", "register 0", "register 1"]
            assert layer["query_grid"] == layer["key_grid"] == [4, 6] and layer["stride"] == 1
            rows = with_fused(rec[path].weights[0])  # (heads + 2, 3 + 24, 3 + 24)
            assert_quantized(layer["rows"]["maps"], rows[..., 3:].numpy(), path)
            prefix = np.frombuffer(__import__("base64").b64decode(layer["rows"]["prefix"]["q16"]), "<u2") / 65535
            np.testing.assert_allclose(prefix.reshape(4, 27, 3), rows[..., :3].numpy(), atol=0.5 / 65535 + 1e-7)
            assert_quantized(layer["cls"], with_fused(maps.cls_attention(rec, path)[0]).numpy(), path)
            assert_quantized(layer["received"], with_fused(maps.received(rec, path)[0]).numpy(), path)
            with torch.no_grad(), record_attention(model, layers=paths[: k + 1]) as upto:
                model(x)
            rollouts = torch.stack([maps.rollout(upto, fusion)[0] for fusion in ("mean", "max")])
            assert_quantized(layer["rollout"], rollouts.numpy(), f"rollout through {path}")
        targets = [p["index"] for p in image["predictions"]]
        grads = torch.stack([maps.grad_rollout(model, x, t)[0] for t in targets])
        assert_quantized(image["grad_rollout"], grads.numpy(), "gradient rollout")


def test_mean_pooled_vit_without_class_token(tmp_path):
    model = small_vit(pool="mean", class_token=False, depth=2)
    explore(model, pictures()[:1], tmp_path / "mean.html", data_config=RGB_SPEC)
    image = read_page_data(tmp_path / "mean.html")["images"][0]
    x, rec, _ = recorded(model, pictures()[0])
    for layer in image["layers"]:
        assert layer["prefix"] == [] and "cls" not in layer and "prefix" not in layer["rows"]
        assert_quantized(layer["rows"]["maps"], with_fused(rec[layer["path"]].weights[0]).numpy(), layer["path"])
    assert_quantized(image["grad_rollout"], np.stack([maps.grad_rollout(model, x, p["index"])[0].numpy()
                                                      for p in image["predictions"]]))  # fmt: skip


class GridCNN(nn.Module):
    """conv stem (stride ``stride``) → SelfAttention2d (pooled keys) → classifier."""

    def __init__(self, stride: int = 3, heads: int = 2, kv_pool: int = 2, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=stride, padding=1), nn.ReLU())
        self.attn = SelfAttention2d(channels, num_heads=heads, qk_channels=2 * heads, kv_pool=kv_pool)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4))
        nn.init.ones_(self.attn.gamma)

    def forward(self, x):
        return self.head(self.attn(self.stem(x)))


def test_cnn_page_holds_the_recorded_weights(tmp_path):
    """A 6×8 query grid with keys pooled to 3×4: rows and attention received per head."""
    model = GridCNN().eval()
    explore(model, pictures(), tmp_path / "cnn.html", data_config=RGB_SPEC)
    for picture, image in zip(pictures(), read_page_data(tmp_path / "cnn.html")["images"], strict=True):
        _, rec, _ = recorded(model, picture)
        (layer,) = image["layers"]
        assert (layer["path"], layer["kind"], layer["query_grid"], layer["key_grid"]) == (
            "attn",
            "grid",
            [6, 8],
            [3, 4],
        )
        assert layer["extent"] == [3.0, 4.0] and layer["prefix"] == [] and "cls" not in layer
        weights = rec["attn"].weights[0]  # (2, 48, 12)
        assert_quantized(layer["rows"]["maps"], with_fused(weights).numpy(), "rows")
        assert_quantized(layer["received"], with_fused(maps.received(rec, "attn")[0]).numpy(), "received")
        assert image["grad_rollout"] is None and len(image["predictions"]) == 4


def test_a_window_block_page_holds_full_grid_rows_zero_outside_each_window(tmp_path):
    """WindowAttention2d (window 4, shift 2) on the 6×8 grid: the page's rows are the recorded
    full-grid rows, and a query's row is zero at every cell outside its window (windows of rows
    and columns [0, 2), [2, 6), [6, 8) by the definition)."""
    model = GridCNN().eval()
    model.attn = WindowAttention2d(8, window_size=4, shift=2, num_heads=2, qk_channels=4)
    nn.init.ones_(model.attn.gamma)
    explore(model, pictures()[:1], tmp_path / "window.html", data_config=RGB_SPEC)
    (image,) = read_page_data(tmp_path / "window.html")["images"]
    (layer,) = image["layers"]
    assert (layer["query_grid"], layer["key_grid"]) == ([6, 8], [6, 8])
    _, rec, _ = recorded(model, pictures()[0])
    assert_quantized(layer["rows"]["maps"], with_fused(rec["attn"].weights[0]).numpy(), "rows")
    window = [(i + 2) // 4 for i in range(8)]  # the window index of each row / column
    rows = dequantize(layer["rows"]["maps"]).reshape(4, 6, 8, 6, 8)  # 2 heads + mean + max, query, key
    for qy, qx, ky, kx in np.ndindex(6, 8, 6, 8):
        if (window[qy], window[qx]) != (window[ky], window[kx]):
            assert (rows[:, qy, qx, ky, kx] == 0).all()


def test_the_budget_subsamples_query_cells_and_says_so(tmp_path, monkeypatch):
    """A 32×32 grid: all query rows would be 1 MB; at max_mb=0.4 the page keeps a subsampled grid
    of query cells (recorded with queries=), stays within the budget and says so; attention
    received still averages every query (computed a chunk of cells at a time)."""
    monkeypatch.setattr(explore_module, "RECEIVED_CHUNK_BYTES", 300 * 1024 * 4)  # chunks of 300, 300, 300, 124 cells
    model = GridCNN(stride=1, heads=1, kv_pool=1).eval()
    config = dataclasses.replace(RGB_SPEC, img_size=(32, 32))
    page = explore(model, pictures()[:1], tmp_path / "small.html", data_config=config, max_mb=0.4)
    assert page.bytes <= 0.4e6 and page.strides["attn"] >= 2
    data = read_page_data(tmp_path / "small.html")
    assert data["notes"] == page.notes and "one cell in every" in page.notes[0] and "0.4 MB" in page.notes[0]
    layer = data["images"][0]["layers"][0]
    s, offset = layer["stride"], layer["offset"]
    x = Preprocess.from_spec(config)(pictures()[0])[None]
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    full = rec["attn"].weights[0, 0].reshape(32, 32, 32 * 32)
    kept = full[offset::s, offset::s].reshape(-1, 32, 32)
    assert_quantized(layer["rows"]["maps"], kept.numpy(), "kept rows")
    assert_quantized(layer["received"], maps.received(rec, "attn")[0].numpy(), "received over all cells")
    with pytest.raises(ValueError, match="max_mb=0.002 is too small.*give at least"):
        explore(model, pictures()[:1], tmp_path / "tiny.html", data_config=config, max_mb=0.002)


def test_hybrid_page_has_grid_and_token_layers(tmp_path):
    backbone = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), SelfAttention2d(8, num_heads=2, qk_channels=4))
    model = HybridViT(backbone, out_layer=None, img_size=(16, 24), embed_dim=16, depth=2, num_heads=2, num_classes=3)
    nn.init.ones_(backbone[1].gamma)
    explore(model.eval(), pictures()[:1], tmp_path / "hybrid.html", data_config=RGB_SPEC)
    image = read_page_data(tmp_path / "hybrid.html")["images"][0]
    _, rec, _ = recorded(model, pictures()[0])
    kinds = {layer["path"]: layer["kind"] for layer in image["layers"]}
    assert kinds == {"patch_embed.backbone.1": "grid", "blocks.0.attn": "token", "blocks.1.attn": "token"}
    for layer in image["layers"]:
        weights = with_fused(rec[layer["path"]].weights[0])
        assert_quantized(layer["rows"]["maps"], weights[..., len(layer["prefix"]) :].numpy(), layer["path"])
    assert image["grad_rollout"]["shape"] == [3, 4, 6]


def test_the_page_is_one_self_contained_file_shipped_with_the_package(tmp_path):
    explore(small_vit(depth=1), pictures()[:1], tmp_path / "p.html", data_config=RGB_SPEC, title="a </script> b")
    text = (tmp_path / "p.html").read_text()
    assert "http://" not in text and "https://" not in text and 'src="//' not in text  # nothing to fetch
    assert text.count("</script>") == 2 and "a &lt;/script&gt; b" in text
    assert read_page_data(text)["title"] == "a </script> b"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "explain/explorer.html" in package_data["visattn"]
    with pytest.raises(ValueError, match="cmap"):
        explore(small_vit(depth=1), pictures()[:1], tmp_path / "q.html", cmap="rainbow")


def test_explore_command_with_a_checkpoint_and_a_pretrained_file(tmp_path, capsys):
    import timm

    model = small_vit(depth=1, num_classes=3)
    model_config = dict(name="vit_digits_patch4_16", img_size=[16, 24], patch_size=4, num_classes=3, in_chans=3,
                        embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, class_token=True, pool="cls")  # fmt: skip
    data_config = {**RGB_SPEC.to_dict(), "class_names": ["cat", "dog", "fox"]}  # as stored
    save_checkpoint(tmp_path / "best.pt", model, model_config, data_config=data_config)
    pictures()[1].save(tmp_path / "tall.png")
    argv = ["explore", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "tall.png"), "--out"]
    assert main([*argv, str(tmp_path / "ckpt.html")]) == 0
    assert "ckpt.html" in capsys.readouterr().out
    image = read_page_data(tmp_path / "ckpt.html")["images"][0]
    assert {p["label"] for p in image["predictions"]} == {"cat", "dog", "fox"}
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "test_vit.pth")
    argv = ["explore", "--model", "test_vit", "--pretrained-file", str(tmp_path / "test_vit.pth")]
    assert main([*argv, "--image", str(tmp_path / "tall.png"), "--out", str(tmp_path / "timm.html")]) == 0
    image = read_page_data(tmp_path / "timm.html")["images"][0]
    info = timm.data.ImageNetInfo("imagenet-1k")
    assert image["input_size"] == [160, 160] and len(image["layers"]) == 6
    assert image["predictions"][0]["label"] == info.index_to_description(image["predictions"][0]["index"])


def test_a_model_with_nan_weights_gets_no_page(tmp_path):
    """A NaN weight (a diverged run) made a page whose JSON held `NaN`: a blank page in the browser."""
    model = small_vit(depth=1)
    with torch.no_grad():
        model.head.weight[2, 0] = float("nan")  # one class score of six is NaN
    message = r"the model's output for picture 1: 1 of 6 values are NaN or infinite; the model's weights"
    with pytest.raises(ValueError, match=message):
        explore(model, pictures()[:1], tmp_path / "nan.html", data_config=RGB_SPEC)
    assert not list(tmp_path.iterdir())


def test_a_map_that_is_not_finite_is_refused_by_name(tmp_path, monkeypatch):
    """Finite scores but a map with an infinite value (an overflow): refused, naming the map."""
    received = maps.received

    def overflowing(recording, layer):
        heads = received(recording, layer).clone()
        heads[0, 1, 2, 3] = float("inf")
        return heads

    monkeypatch.setattr(explore_module.maps, "received", overflowing)
    # head 1, the mean and the max of the heads: 3 of the 4 × 4 × 6 values of the first layer's maps
    message = r"the attention received in blocks\.0\.attn: 3 of 96 values are NaN or infinite"
    with pytest.raises(ValueError, match=message):
        explore(small_vit(depth=2), pictures()[:1], tmp_path / "inf.html", data_config=RGB_SPEC)
    assert not list(tmp_path.iterdir())


def test_the_page_data_is_strict_json(tmp_path):
    """`NaN` and `Infinity` are not JSON (`JSON.parse` refuses them): writing them is refused too."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not JSON compliant"):
            explore_module._fill_template({"p": bad}, "title")
    with pytest.raises(ValueError, match="max_mb must be a positive number of megabytes, got inf"):
        explore(small_vit(depth=1), pictures()[:1], tmp_path / "p.html", data_config=RGB_SPEC, max_mb=float("inf"))
    assert not list(tmp_path.iterdir())
