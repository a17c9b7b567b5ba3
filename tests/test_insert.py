"""insert_attention and attention_sites: exact identity at insertion, keys, copies, errors, costs."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.insert_digits import TinyResNet, train_digits
from visattn import SelfAttention2d, attention_sites, create_model, format_sites, insert_attention
from visattn.cli import main
from visattn.models.insert import BLOCKS

# model name → sites (one top-level stage, one nested block or inner index)
MODELS = {
    "torchvision:resnet18": ["layer3", "layer4.1"],
    "torchvision:resnet50": ["layer2.3", "layer3"],
    "torchvision:convnext_tiny": ["features.3", "features.5.2"],
    "torchvision:efficientnet_b0": ["features.4", "features.6"],
    "torchvision:mobilenet_v3_large": ["features.6", "features.12"],
    "torchvision:vgg11_bn": ["features.10", "features.20"],
    "timm:resnet18": ["layer2", "layer4.0"],
    "timm:resnet50": ["layer3.5", "layer4"],
    "timm:convnext_atto": ["stages.1", "stages.2.blocks.1"],
    "timm:efficientnet_b0": ["blocks.3", "blocks.5"],
}


def forward(model: nn.Module, x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """Logits with a fixed RNG state (dropout and stochastic depth draw the same numbers)."""
    torch.manual_seed(seed)
    return model(x)


#: VGG's 100-million-parameter classifier makes it seconds to build and copy: a slow test
SLOW_MODELS = {"torchvision:vgg11_bn"}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_MODELS else []) for name in MODELS]
)
def test_identity_at_insertion_keys_and_the_block_runs(name):
    model = create_model(name, num_classes=5)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as in a trained network
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    original = copy.deepcopy(model)
    original_sd = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)

    inserted = insert_attention(model, MODELS[name], num_heads=2)
    assert inserted == [p.replace(".", "_") + "_attn" for p in MODELS[name]]
    assert type(model) is type(original)

    # keys: all the old ones with the same tensors, plus exactly the new blocks' keys
    new_sd = model.state_dict()
    added = set(new_sd) - set(original_sd)
    assert set(original_sd) <= set(new_sd)
    assert added and all(k.split(".")[0] in inserted for k in added)
    assert all(torch.equal(new_sd[k], v) for k, v in original_sd.items())
    fresh = copy.deepcopy(model)
    result = fresh.load_state_dict(original_sd, strict=False)
    assert set(result.missing_keys) == added and not result.unexpected_keys
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, SelfAttention2d)}
    assert sorted(blocks) == sorted(inserted)

    # exact identity: eval, then train mode from the same BatchNorm state and RNG state
    original.eval(), model.eval()
    assert torch.equal(forward(model, x), forward(original, x))
    original.train(), model.train()
    assert torch.equal(forward(model, x), forward(original, x))
    for key, value in original.state_dict().items():  # both updated their statistics alike
        assert torch.equal(model.state_dict()[key], value), key

    # the blocks really run: a non-zero gate changes the logits
    model.eval(), original.eval()
    with torch.no_grad():
        for block in blocks.values():
            block.gamma.fill_(1.0)
    assert not torch.allclose(forward(model, x), forward(original, x))


@pytest.mark.slow
def test_digits_training_with_attention_learns_and_the_gate_moves():
    # Margins no CPU's float rounding can cross: both reach about 98 % here, and chance is 10 %.
    # Whether attention helps is a statistical question: benchmarks/insert_digits.py compares
    # the two over several seeds.
    torch.manual_seed(0)
    plain = TinyResNet()
    with_attention = copy.deepcopy(plain)  # the same initial weights
    insert_attention(with_attention, "layer2", num_heads=2, pos="sincos")
    acc_plain, _ = train_digits(plain)
    acc_attention, _ = train_digits(with_attention)
    block = with_attention.layer2_attn
    assert acc_plain > 0.9 and acc_attention > 0.9, (acc_plain, acc_attention)
    assert block.gamma.abs().item() > 1e-3
    for name, p in block.named_parameters():  # every inserted parameter got a gradient
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_reaches_the_gate_first_then_every_block_parameter():
    model = TinyResNet()
    (name,) = insert_attention(model, ["layer1"], num_heads=2)
    block = model.get_submodule(name)
    x = torch.randn(4, 1, 16, 16)
    model(x).logsumexp(-1).sum().backward()
    assert block.gamma.grad.abs() > 0  # γ = 0: the gate alone has a gradient at insertion
    assert block.query.weight.grad is None or not block.query.weight.grad.any()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    model(x).logsumexp(-1).sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_state_dict_round_trip_deepcopy_and_presets():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    insert_attention(model, ["layer1"], preset="sagan")
    insert_attention(model, ["layer2"], preset="non_local", qk_channels=8)
    assert model.layer1_attn.kv_pool == 2 and isinstance(model.layer2_attn.out_norm, nn.BatchNorm2d)
    assert model.layer2_attn.qk_channels == 8  # block kwargs override the preset
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        model.layer1_attn.gamma.fill_(0.7)
        model.layer2_attn.out_norm.weight.fill_(0.5)
    expected = model(x)

    rebuilt = TinyResNet().eval()
    insert_attention(rebuilt, ["layer1"], preset="sagan")
    insert_attention(rebuilt, ["layer2"], preset="non_local", qk_channels=8)
    rebuilt.load_state_dict(model.state_dict())  # strict
    assert torch.equal(rebuilt(x), expected)

    doubled = copy.deepcopy(model).double()  # .to() carries the blocks along
    assert doubled.layer1_attn.gamma.dtype == torch.float64
    torch.testing.assert_close(doubled(x.double()), expected.double(), atol=1e-5, rtol=1e-5)

    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), expected)
    with torch.no_grad():
        twin.layer1_attn.gamma.fill_(0.0)  # the copy's hook runs the copy's block …
    assert not torch.equal(twin(x), expected)
    assert torch.equal(model(x), expected)  # … and the original's stays its own


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    original = create_model("torchvision:resnet18", num_classes=5).eval()
    model = copy.deepcopy(original)
    insert_attention(model, ["layer2", "layer3"], num_heads=2)
    x = torch.randn(2, 3, 64, 64)
    last = x.to(memory_format=torch.channels_last)
    ref_last = copy.deepcopy(original).to(memory_format=torch.channels_last)
    model_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert torch.equal(model_last(last), ref_last(last))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = model(x), original(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    with torch.no_grad():
        for m in (model, model_last):
            m.layer2_attn.gamma.fill_(0.5)
    torch.testing.assert_close(model_last(last), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_runs_the_blocks():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    insert_attention(model, ["layer2"], num_heads=2)
    with torch.no_grad():
        model.layer2_attn.gamma.fill_(0.5)
    x = torch.randn(2, 1, 16, 16)
    # fullgraph: the hook and the block are traced without a graph break; aot_eager keeps the
    # test short (inductor's code generation is not what the hooks could break)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    without = copy.deepcopy(model)
    with torch.no_grad():
        without.layer2_attn.gamma.fill_(0.0)
    assert not torch.allclose(compiled(x), without(x))  # the block is in the compiled graph


def test_errors_name_the_problem():
    model = TinyResNet()
    with pytest.raises(ValueError, match=r"no submodule 'layer_2'.*close matches: layer2"):
        insert_attention(model, "layer_2")
    with pytest.raises(ValueError, match=r"'fc' gave shape \(1, 10\)"):
        insert_attention(model, "fc")
    with pytest.raises(ValueError, match="more than once"):
        insert_attention(model, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="preset"):
        insert_attention(model, "layer1", preset="cbam")
    with pytest.raises(ValueError, match=r"unknown attention block 'globl' \(did you mean 'global'\?\)"):
        insert_attention(model, "layer1", block="globl")
    with pytest.raises(ValueError, match="has no attention_cost"):
        insert_attention(model, "layer1", block=nn.Conv2d)
    with pytest.raises(ValueError, match="root is a Sequential"):
        insert_attention(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), "0")
    with pytest.raises(ValueError, match="input_size"):
        insert_attention(model, "layer1", input_size=(3, 16, 16))  # wrong channels for the dry run
    insert_attention(model, "layer1")
    with pytest.raises(ValueError, match="inserted before"):
        insert_attention(model, "layer1")
    assert [n for n, m in model.named_modules() if isinstance(m, SelfAttention2d)] == ["layer1_attn"]


def test_a_block_by_name_or_class_is_the_same_block():
    by_name, by_class = TinyResNet(), TinyResNet()
    insert_attention(by_name, "layer1", block="global", num_heads=2)
    insert_attention(by_class, "layer1", block=SelfAttention2d, num_heads=2)
    assert type(by_name.layer1_attn) is type(by_class.layer1_attn) is SelfAttention2d
    assert by_name.state_dict().keys() == by_class.state_dict().keys()


@pytest.mark.parametrize(
    ("block", "options"),
    [("window", {"window_size": 3, "shift": 1}), ("neighborhood", {"kernel_size": 3}), ("halo", {"block_size": 2})],
)
def test_each_family_by_name_is_the_identity_at_insertion_and_trains(block, options):
    model, x = TinyResNet().eval(), torch.randn(2, 1, 16, 16)
    before = model(x)
    assert insert_attention(model, ["layer1", "layer2"], block=block, num_heads=2, **options) == [
        "layer1_attn",
        "layer2_attn",
    ]
    assert torch.equal(model(x), before)
    assert type(model.layer1_attn) is BLOCKS[block]
    model.train()
    model(x).sum().backward()
    assert model.layer1_attn.gamma.grad is not None and model.layer1_attn.gamma.grad.abs().sum() > 0
    config = create_model("resnet18_small", num_classes=3, attention={"at": ["layer3"], "block": block, **options})
    assert type(config.layer3_attn) is BLOCKS[block]


def test_a_preset_is_global_attention_only():
    with pytest.raises(ValueError, match="preset='sagan' is a global attention block"):
        insert_attention(TinyResNet(), "layer1", preset="sagan", block="window")


def test_sites_of_a_local_family_count_its_tiles():
    """Window 4: a 20×24 grid is 5×6 whole windows, 16 scores per query; an 18×18 grid has 5
    windows per axis, the last of 2 cells padded to 4 query and key slots, which the kernel
    computes too: (5·4·4)² scores per head."""
    model = create_model("resnet18_small", in_chans=1)
    (site,) = [
        s for s in attention_sites(model, (1, 40, 48), block="window", window_size=4, max_depth=1) if s.path == "layer2"
    ]
    assert (site.height, site.width, site.keys) == (20, 24, 16)
    assert site.materialized_bytes == 20 * 24 * 16 * 4  # 5 × 6 whole windows: no padded slot
    (site,) = [
        s for s in attention_sites(model, (1, 36, 36), block="window", window_size=4, max_depth=1) if s.path == "layer2"
    ]
    assert (
        site.height == 18 and site.materialized_bytes == (5 * 4 * 4) ** 2 * 4
    )  # 5 windows per axis, the last of 2 padded to 4
    head_dim = 128 // 8
    assert site.flops == 2 * 1 * (5 * 4 * 4) ** 2 * 2 * head_dim


def test_attention_config_forms():
    for config in ({"at": "layer3", "num_heads": 2}, OmegaConf.create({"at": ["layer3"], "num_heads": 2})):
        model = create_model("torchvision:resnet18", num_classes=3, attention=config)
        assert model.layer3_attn.num_heads == 2
    model = create_model("torchvision:resnet18", attention={"at": "layer4", "input_size": [3, 40, 40]})
    assert model.layer4_attn.channels == 512
    with pytest.raises(ValueError, match="needs 'at'"):
        create_model("torchvision:resnet18", attention={"num_heads": 2})


def test_sites_match_a_real_forward_and_the_costs():
    model = create_model("torchvision:resnet18", num_classes=3).eval()
    sites = {s.path: s for s in attention_sites(model, (3, 64, 96), num_heads=2, kv_pool=3)}
    assert "fc" not in sites and "avgpool" not in sites  # 2-D output / a leaf
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(model, name)(h)
            site = sites[name]
            assert (site.channels, site.height, site.width) == tuple(h.shape[1:])
            n, keys = h.shape[2] * h.shape[3], -(-h.shape[2] // 3) * -(-h.shape[3] // 3)
            assert (site.tokens, site.keys) == (n, keys)
            assert site.materialized_bytes == n * keys * 4
            head_dim = -(-h.shape[1] // 8 // 2)
            assert site.fused_bytes == (2 * n + 2 * keys) * head_dim * 4
    assert sites["layer1"].height == 16 and sites["layer1"].width == 24
    leaves = {s.path for s in attention_sites(model, (3, 64, 96), leaves=True)}
    assert {"conv1", "layer1.0.conv1", "maxpool"} <= leaves
    table = format_sites(list(sites.values()))
    assert "| `layer3` | Sequential | 256 × 4 × 6 | 24 |" in table


def test_sites_depth_and_the_cli(capsys):
    model = create_model("resnet18_small", in_chans=1)
    assert [s.path for s in attention_sites(model, (1, 32, 32), max_depth=1)] == [f"layer{i}" for i in range(1, 5)]
    assert main(["sites", "resnet18_small", "--input-size", "1", "32", "40", "--depth", "1", "--kv-pool", "2"]) == 0
    out = capsys.readouterr().out
    assert "| `layer2` | Sequential | 128 × 16 × 20 | 320 | 80 | 100.0 KiB |" in out
    assert (
        main(["sites", "resnet18_small", "--input-size", "1", "32", "40", "--depth", "1", "--block-arg", "kv_pool=2"])
        == 0
    )
    assert "| `layer2` | Sequential | 128 × 16 × 20 | 320 | 80 | 100.0 KiB |" in capsys.readouterr().out


def test_sites_skip_inserted_blocks():
    model = TinyResNet()
    insert_attention(model, "layer1")
    sites = attention_sites(model, (1, 16, 16), leaves=True)
    assert sites and all(s.kind != "SelfAttention2d" for s in sites)
