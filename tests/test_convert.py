"""timm / torchvision ViTs converted to visattn: the peer itself (same weights) is the oracle.

Every peer's parameters are perturbed away from their initialization first, so a weight mapped
to the wrong place (e.g. norm1 ↔ norm2, both all-ones at init) changes the output.
"""

from __future__ import annotations

import urllib.error

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn

import visattn
from visattn import create_model, from_timm, from_torchvision
from visattn.layers.attention import RecordingRequest
from visattn.weights.errors import PretrainedUnavailableError, UnsupportedModelError
from visattn.weights.torchvision_vit import torchvision_to_timm_names

TOL = dict(atol=1e-4, rtol=0)  # float32 logits and features
ATTN_TOL = dict(atol=1e-5, rtol=0)  # attention weights


@torch.no_grad()
def _perturb(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _timm_attention(peer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's own attention weights: fused attention off, softmax output read at ``attn_drop``."""
    weights, hooks = [], []
    for block in peer.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, out: weights.append(out)))
    try:
        peer(x)
    finally:
        for hook in hooks:
            hook.remove()
    return weights


def _visattn_attention(model: visattn.VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    weights = []
    for block in model.blocks:
        block.attn.recording = RecordingRequest(lambda module, record: weights.append(record.weights))
    try:
        model(x)
    finally:
        for block in model.blocks:
            block.attn.recording = None
    return weights


#: the named peers as timm builds them; the ViT-S and ViT-B ones with 2 blocks at 64 px (their width,
#: heads and patch are what differs from ViT-Ti, which is converted at its full size)
TIMM_PEERS = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", dict(depth=2, img_size=64)),
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),  # distillation token and head_dist
    ("vit_small_patch16_224.dino", dict(depth=2, img_size=64)),  # num_classes=0: logits are the class token features
    ("vit_base_patch32_224", dict(depth=2, img_size=64)),
    ("vit_tiny_patch16_224", dict(global_pool="avg", class_token=False, img_size=64)),  # fc_norm
    ("vit_tiny_patch16_224", dict(img_size=(48, 80), reg_tokens=2, init_values=0.1, qk_norm=True, no_embed_class=True)),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")),
]


@pytest.mark.parametrize(("name", "kwargs"), TIMM_PEERS, ids=lambda v: str(v) if v else "default")
@torch.no_grad()
def test_timm_peer_logits_features_and_attention(name, kwargs):
    peer = _perturb(timm.create_model(name, pretrained=False, **kwargs))
    ours = from_timm(peer).eval()
    x = torch.randn(1, 3, *peer.patch_embed.img_size)
    torch.testing.assert_close(ours(x), peer(x), **TOL)
    torch.testing.assert_close(ours.forward_features(x), peer.forward_features(x), **TOL)
    assert ours.num_classes == peer.num_classes

    theirs = _timm_attention(peer, x)
    mine = _visattn_attention(ours, x)
    assert len(mine) == len(theirs) == len(peer.blocks)
    prefix = peer.num_prefix_tokens
    for a, b in zip(mine, theirs, strict=True):
        assert a.shape == b.shape and a.shape[1] == peer.blocks[0].attn.num_heads
        torch.testing.assert_close(a, b, **ATTN_TOL)
        if peer.cls_token is not None:  # class token → patches: what the maps draw
            torch.testing.assert_close(a[:, :, 0, prefix:], b[:, :, 0, prefix:], **ATTN_TOL)


@torch.no_grad()
def test_dynamic_size_peer_matches_at_other_input_sizes():
    """Both resample the learned positions for other grids the same way (timm's resampler)."""
    peer = _perturb(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, img_size=64, reg_tokens=1)
    )
    ours = from_timm(peer).eval()
    for size in [(48, 80), (96, 64)]:
        x = torch.randn(1, 3, *size)
        torch.testing.assert_close(ours(x), peer(x), **TOL)


@torch.no_grad()
def test_timm_state_dict_needs_a_name_and_matches_the_model():
    peer = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5))
    x = torch.randn(2, 3, 64, 64)
    ours = from_timm(peer.state_dict(), name="vit_tiny_patch16_224", img_size=64).eval()
    assert ours.num_classes == 5  # read from the head's shape
    torch.testing.assert_close(ours(x), peer(x), **TOL)
    with pytest.raises(ValueError, match="name='vit_small_patch16_224'"):
        from_timm(peer.state_dict())
    with pytest.raises(ValueError, match=r"wrong shape: cls_token \(1, 1, 192\) \(model: \(1, 1, 384\)\)"):
        from_timm(peer.state_dict(), name="vit_small_patch16_224", img_size=64)


def _tiny_timm(**kwargs) -> nn.Module:
    return timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [
        (dict(global_pool="map"), "attention-pool head"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(patch_drop_rate=0.1), "PatchDropout"),
        (dict(dynamic_img_pad=True), "dynamic_img_pad"),
        (dict(scale_attn_norm=True), "scale_attn_norm"),
        (dict(mlp_layer=SwiGLUPacked, act_layer="silu"), "SwiGLU"),
        (dict(act_layer="relu"), "activation"),
        (dict(norm_layer="rmsnorm"), "norm layer RmsNorm"),
        (dict(pos_embed="none"), "no positional embedding"),
    ],
)
def test_unsupported_timm_features_are_named(kwargs, feature):
    with pytest.raises(UnsupportedModelError, match=feature):
        from_timm(_tiny_timm(**kwargs))


def test_non_vit_timm_models_are_refused():
    relpos = timm.models.vision_transformer_relpos.VisionTransformerRelPos
    with pytest.raises(UnsupportedModelError, match="VisionTransformerRelPos is not timm's VisionTransformer"):
        from_timm(relpos(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    distilled = timm.models.deit.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    distilled.set_distilled_training(True)  # training would return the two heads' logits apart
    with pytest.raises(UnsupportedModelError, match="distilled_training=True"):
        from_timm(distilled)


@pytest.fixture(scope="module")
def torchvision_vit_b_32() -> nn.Module:
    """torchvision's ViT-B/32 (width 768, 12 heads, 32-pixel patches) with 2 layers at 64 px."""
    torch.manual_seed(0)
    return _perturb(
        torchvision.models.VisionTransformer(
            image_size=64, patch_size=32, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072
        )
    )


def _torchvision_features(peer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = peer._process_input(x)
    return peer.encoder(torch.cat([peer.class_token.expand(x.shape[0], -1, -1), tokens], dim=1))


@torch.no_grad()
def test_torchvision_vit_b_32(torchvision_vit_b_32):
    peer = torchvision_vit_b_32
    ours = from_torchvision(peer).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), peer(x), **TOL)
    torch.testing.assert_close(ours.forward_features(x), _torchvision_features(peer, x), **TOL)
    assert ours.blocks[0].norm1.eps == 1e-6 and ours.model_config["num_heads"] == 12

    # attention: torch's own MultiheadAttention, asked for per-head weights on ln_1's output
    inputs, hooks = (
        [],
        [layer.ln_1.register_forward_hook(lambda m, i, out: inputs.append(out)) for layer in peer.encoder.layers],
    )
    peer(x)
    for hook in hooks:
        hook.remove()
    mine = _visattn_attention(ours, x)
    for layer, y, a in zip(peer.encoder.layers, inputs, mine, strict=True):
        _, theirs = layer.self_attention(y, y, y, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(a, theirs, **ATTN_TOL)

    from_state = from_torchvision(peer.state_dict()).eval()  # architecture read from the shapes
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert {k: v.shape for k, v in from_state.state_dict().items()} == shapes
    assert from_state.model_config["name"] == "vision_transformer"  # save_pretrained can write it
    torch.testing.assert_close(from_state(x), peer(x), **TOL)


@torch.no_grad()
def test_torchvision_files_through_create_model(torchvision_vit_b_32, tmp_path):
    peer = torchvision_vit_b_32
    path = tmp_path / "vit_b_32.safetensors"
    save_file(peer.state_dict(), str(path))
    x = torch.randn(1, 3, 64, 64)
    same = create_model("vit_b_32", pretrained_file=path).eval()  # the architecture read from the file's shapes
    torch.testing.assert_close(same(x), peer(x), **TOL)
    assert same.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    as_timm = create_model(
        "vit_base_patch32_224", pretrained_file=path, num_classes=10, depth=2, img_size=64
    ).eval()  # timm name, torchvision file
    torch.testing.assert_close(as_timm.forward_features(x), _torchvision_features(peer, x), **TOL)
    assert as_timm(x).shape == (1, 10) and as_timm.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]


def test_torchvision_pre_logits_are_refused():
    state = {"heads.pre_logits.weight": torch.zeros(1), "class_token": torch.zeros(1)}
    with pytest.raises(UnsupportedModelError, match="heads.pre_logits"):
        torchvision_to_timm_names(state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@torch.no_grad()
def test_pretrained_file_then_new_head(tmp_path, suffix):
    """create_model(name, pretrained_file=PATH, num_classes=10): backbone from the file, fresh head."""
    peer = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64))
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(peer.state_dict(), path)
    else:
        save_file(peer.state_dict(), str(path))
    x = torch.randn(2, 3, 64, 64)
    same = create_model("vit_tiny_patch16_224", pretrained_file=path, img_size=64).eval()
    torch.testing.assert_close(same(x), peer(x), **TOL)
    tuned = create_model("vit_tiny_patch16_224", pretrained_file=path, img_size=64, num_classes=10).eval()
    torch.testing.assert_close(tuned.forward_features(x), peer.forward_features(x), **TOL)
    assert tuned(x).shape == (2, 10) and tuned.model_config["num_classes"] == 10
    assert torch.count_nonzero(tuned.head.bias) == 0  # a fresh head, as timm does
    resampled = create_model("vit_tiny_patch16_224", pretrained_file=path)  # 64 → 224: positions resampled by timm
    assert resampled.pos_embed.shape == (1, 1 + 14 * 14, 192)


@torch.no_grad()
def test_headless_file_like_dino(tmp_path):
    """A backbone-only file (DINO's has no head): no head unless num_classes asks for one."""
    peer = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0))
    torch.save(peer.state_dict(), tmp_path / "backbone.pth")
    x = torch.randn(1, 3, 32, 32)
    features = create_model("vit_tiny_patch16_224", pretrained_file=tmp_path / "backbone.pth", img_size=32).eval()
    assert features.num_classes == 0
    torch.testing.assert_close(features(x), peer(x), **TOL)
    tuned = create_model("vit_tiny_patch16_224", pretrained_file=tmp_path / "backbone.pth", img_size=32, num_classes=10)
    assert tuned.eval()(x).shape == (1, 10)


@torch.no_grad()
def test_grayscale_small_patch_fine_tuning_setup(tmp_path):
    """What train.py asks for the digits (in_chans=1, 16×16, 4×4 patches, 10 classes) from an RGB file:
    summed RGB filters make a gray image's logits those of the same image repeated on three channels."""
    peer = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2))
    torch.save(peer.state_dict(), tmp_path / "rgb.pth")
    gray = create_model(
        "vit_tiny_patch16_224", pretrained_file=tmp_path / "rgb.pth", img_size=32, depth=2, in_chans=1
    ).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(gray(x), peer(x.expand(-1, 3, -1, -1)), **TOL)
    digits = create_model(
        "vit_tiny_patch16_224",
        pretrained_file=tmp_path / "rgb.pth",
        depth=2,
        in_chans=1,
        img_size=16,
        patch_size=4,
        num_classes=10,
    )
    assert digits.patch_embed.proj.weight.shape == (192, 1, 4, 4) and digits.pos_embed.shape == (1, 1 + 16, 192)
    assert digits(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("vit_tiny_patch16_224", pretrained_file=tmp_path / "missing.pth")
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match="not a loadable weights file"):
        create_model("vit_tiny_patch16_224", pretrained_file=truncated)
    pickled = tmp_path / "pickled.pth"
    torch.save({"layer": nn.Linear(2, 2)}, pickled)  # a module, not tensors: refused by weights_only
    with pytest.raises(ValueError, match="refused for safety"):
        create_model("vit_tiny_patch16_224", pretrained_file=pickled)
    with pytest.raises(ValueError, match="config.json does not exist; a folder written by save_pretrained"):
        create_model("vit_tiny_patch16_224", pretrained_file=tmp_path)  # a folder, but not a saved one


def test_offline_without_cache_says_how_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        PretrainedUnavailableError,
        match=r"pretrained_file=.*huggingface.co/timm/vit_small_patch16_224\.dino|huggingface.co/timm/vit_small_patch16_224\.dino.*pretrained_file=",
    ):
        create_model("vit_small_patch16_224.dino", pretrained=True)


def test_torchvision_offline_error(monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(PretrainedUnavailableError, match=r"download.pytorch.org/models/vit_b_32.*pretrained_file="):
        create_model("vit_b_32", pretrained=True)


def test_create_model_names():
    deit = create_model("deit_tiny_patch16_224", img_size=32)  # a timm name visattn does not register
    assert (
        isinstance(deit, visattn.VisionTransformer)
        and deit.pretrained_cfg["source"] == "timm:deit_tiny_patch16_224.fb_in1k"
    )
    with pytest.raises(ValueError, match="no published weights"):
        create_model("vit_digits_patch4_16", pretrained=True)
    with pytest.raises(ValueError, match="did you mean"):
        create_model("vit_tiny_patch16_244", pretrained=True)
