"""Constructor arguments out of range: one `ValueError` at construction naming the argument,
its value and its valid range (before: `ZeroDivisionError`, a `linspace` error, or a model that
was built and failed in its first forward pass)."""

from __future__ import annotations

import math

import pytest

from visattn import (
    EncoderBlock,
    HaloAttention2d,
    HybridViT,
    MultiHeadAttention,
    NeighborhoodAttention2d,
    SelfAttention2d,
    VisionTransformer,
    WindowAttention2d,
    attention_sites,
    create_model,
    insert_attention,
)
from visattn._utils import ArgumentError, check_range

#: (id, constructor call, argument at fault, the valid range the message states)
BAD = [
    ("vit patch 0", lambda: VisionTransformer(patch_size=0), "patch_size", "an integer >= 1"),
    ("vit patch pair", lambda: VisionTransformer(patch_size=(16, 0)), "patch_size", "pair (h, w)"),
    ("vit depth -1", lambda: VisionTransformer(depth=-1), "depth", "an integer >= 1"),
    ("vit depth float", lambda: VisionTransformer(depth=2.0), "depth", "an integer >= 1"),
    ("vit heads 0", lambda: VisionTransformer(num_heads=0), "num_heads", "an integer >= 1"),
    ("vit heads -2", lambda: VisionTransformer(num_heads=-2), "num_heads", "an integer >= 1"),
    ("vit heads divide", lambda: VisionTransformer(embed_dim=64, num_heads=5), "num_heads", "[1, 2, 4, 8, 16, 32, 64]"),
    ("vit embed 0", lambda: VisionTransformer(embed_dim=0), "embed_dim", "an integer >= 1"),
    ("vit img 0", lambda: VisionTransformer(img_size=0), "img_size", "an integer >= 1"),
    ("vit in_chans 0", lambda: VisionTransformer(in_chans=0), "in_chans", "an integer >= 1"),
    ("vit classes -1", lambda: VisionTransformer(num_classes=-1), "num_classes", "an integer >= 0"),
    ("vit mlp ratio", lambda: VisionTransformer(mlp_ratio=0.0), "mlp_ratio", "a number > 0"),
    ("vit registers", lambda: VisionTransformer(reg_tokens=-1), "reg_tokens", "an integer >= 0"),
    ("vit drop path 1", lambda: VisionTransformer(drop_path_rate=1.0), "drop_path_rate", ">= 0 and < 1"),
    ("vit attn drop nan", lambda: VisionTransformer(attn_drop_rate=math.nan), "attn_drop_rate", ">= 0 and < 1"),
    ("vit norm eps", lambda: VisionTransformer(norm_eps=0.0), "norm_eps", "a number > 0"),
    ("named vit float", lambda: create_model("vit_digits_patch4_16", embed_dim=1e6), "embed_dim", "an integer"),
    ("window size 0", lambda: WindowAttention2d(16, 0), "window_size", "an integer >= 1"),
    ("window shift", lambda: WindowAttention2d(16, 4, 4), "shift", "an integer >= 0 and < 4"),
    ("window heads 0", lambda: WindowAttention2d(16, num_heads=0), "num_heads", "an integer >= 1"),
    ("window gate", lambda: WindowAttention2d(16, gate=None), "gate", "'scalar' or 'channel'"),
    ("neighborhood even", lambda: NeighborhoodAttention2d(16, 4), "kernel_size", "an odd integer >= 1"),
    ("neighborhood dilation", lambda: NeighborhoodAttention2d(16, 3, 0), "dilation", "an integer >= 1"),
    ("halo block 0", lambda: HaloAttention2d(16, 0), "block_size", "an integer >= 1"),
    ("halo halo -1", lambda: HaloAttention2d(16, 4, -1), "halo_size", "an integer >= 0"),
    ("halo border", lambda: HaloAttention2d(16, border="same"), "border", "'masked' or 'zero'"),
    ("halo dropout", lambda: HaloAttention2d(16, attn_drop=1.0), "attn_drop", ">= 0 and < 1"),
    ("mha heads 0", lambda: MultiHeadAttention(64, 0), "num_heads", "an integer >= 1"),
    ("mha heads divide", lambda: MultiHeadAttention(64, 3), "num_heads", "dim=64 must be a multiple of num_heads=3"),
    ("mha dropout", lambda: MultiHeadAttention(64, 4, attn_drop=-0.1), "attn_drop", ">= 0 and < 1"),
    ("block mlp ratio", lambda: EncoderBlock(64, 4, mlp_ratio=-1), "mlp_ratio", "a number > 0"),
    ("block drop path", lambda: EncoderBlock(64, 4, drop_path=1.5), "drop_path", ">= 0 and < 1"),
    ("block heads bool", lambda: EncoderBlock(64, True), "num_heads", "an integer >= 1"),
    ("sa2d heads 0", lambda: SelfAttention2d(64, num_heads=0), "num_heads", "an integer >= 1"),
    ("sa2d channels 0", lambda: SelfAttention2d(0), "channels", "an integer >= 1"),
    ("sa2d qk divide", lambda: SelfAttention2d(16, num_heads=3, qk_channels=8), "num_heads", "choose num_heads"),
    ("sa2d v 0", lambda: SelfAttention2d(16, v_channels=0), "v_channels", "an integer >= 1"),
    ("sa2d kv_pool 0", lambda: SelfAttention2d(16, kv_pool=0), "kv_pool", "an integer >= 1"),
    ("sa2d dropout", lambda: SelfAttention2d(16, attn_drop=1.0), "attn_drop", ">= 0 and < 1"),
    ("hybrid img 0", lambda: HybridViT(img_size=0), "img_size", "an integer >= 1"),
    ("hybrid heads 0", lambda: HybridViT(num_heads=0), "num_heads", "an integer >= 1"),
    ("resnet in_chans", lambda: create_model("resnet18_small", in_chans=0), "in_chans", "an integer >= 1"),
    ("torchvision classes", lambda: create_model("torchvision:resnet18", num_classes=0), "num_classes", ">= 1"),
    ("timm in_chans", lambda: create_model("timm:resnet18", in_chans=-3), "in_chans", "an integer >= 1"),
    ("cnn attention heads", lambda: create_model("resnet18_small", attention={"at": "layer3", "num_heads": 0}),
     "num_heads", "an integer >= 1"),
    ("sites heads 0", lambda: attention_sites(create_model("resnet18_small"), (3, 32, 32), num_heads=0),
     "num_heads", "an integer >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "argument", "valid"), BAD, ids=[row[0] for row in BAD])
def test_an_argument_out_of_range_is_one_value_error_naming_it(name, build, argument, valid):
    with pytest.raises(ValueError) as raised:
        build()
    error = raised.value
    assert isinstance(error, ArgumentError) and error.argument == argument, repr(error)
    assert argument in str(error) and valid in str(error), str(error)
    assert "\n" not in str(error)


def test_insert_attention_checks_the_block_arguments():
    model = create_model("resnet18_small")
    with pytest.raises(ArgumentError, match="num_heads=-2 is not valid"):
        insert_attention(model, ["layer3"], num_heads=-2, input_size=(3, 32, 32))
    assert not hasattr(model, "layer3_attn")


@pytest.mark.parametrize(
    "value,rule,ok",
    [
        (1, {"at_least": 1, "integer": True}, True),
        (0, {"at_least": 1, "integer": True}, False),
        (True, {"at_least": 1, "integer": True}, False),  # a bool is not a count
        (3.0, {"at_least": 1, "integer": True}, False),
        (0.5, {"at_least": 0, "below": 1}, True),
        (1.0, {"at_least": 0, "below": 1}, False),
        (math.nan, {"at_least": 0, "below": 1}, False),
        ("3", {"at_least": 1, "integer": True}, False),
        ((4, 8), {"at_least": 1, "integer": True, "pair": True}, True),
        ((4, 8, 2), {"at_least": 1, "integer": True, "pair": True}, False),
        ((4, 8), {"at_least": 1, "integer": True}, False),  # a pair only where pairs are asked for
    ],
)
def test_check_range(value, rule, ok):
    if ok:
        check_range("x", value, **rule)
    else:
        with pytest.raises(ArgumentError, match=r"^x=.* is not valid: it must be "):
            check_range("x", value, **rule)
