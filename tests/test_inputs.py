"""Inputs that `SelfAttention2d` and the ViTs cannot take are refused by visattn with its own
message: integer pixels, a dtype other than the weights' (outside autocast), empty grids (the
wrong rank or channel count were checked before). Before, each ended in a PyTorch message about conv biases or
kernel sizes. The checks read only dtypes and sizes, so valid inputs still compile in one graph."""

from __future__ import annotations

import pytest
import torch

from visattn import SelfAttention2d, create_model

MODELS = {
    "SelfAttention2d": lambda: (SelfAttention2d(16), 16, "SelfAttention2d"),
    "ViT": lambda: (create_model("vit_digits_patch4_16"), 1, "the model"),
    "ViT conv stem": lambda: (create_model("vit_digits_patch4_16", stem="conv"), 1, "the model"),
    "HybridViT": lambda: (create_model("hybrid_resnet18_small_vit", depth=1), 3, "the model"),
}
#: (id, a (B, C, H, W) input from the model's C, what the message must say)
BAD = [
    ("int64", lambda c: torch.ones(2, c, 16, 16, dtype=torch.long), "needs a floating-point input, got torch.int64"),
    ("uint8", lambda c: torch.ones(2, c, 16, 16, dtype=torch.uint8), "got torch.uint8; convert it with x.float()"),
    ("bool", lambda c: torch.ones(2, c, 16, 16, dtype=torch.bool), "floating-point"),
    ("float64", lambda c: torch.ones(2, c, 16, 16, dtype=torch.float64), "float32 weights but got a torch.float64"),
    ("empty height", lambda c: torch.ones(2, c, 0, 16), "empty grid (2, "),
    ("empty width", lambda c: torch.ones(2, c, 16, 0), "height and width must be at least 1"),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD, ids=[row[0] for row in BAD])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_bad_input_is_refused_with_visattn_message(model_name, bad):
    _, make_input, message = bad
    model, channels, owner = MODELS[model_name]()
    x = make_input(channels)
    with pytest.raises(ValueError) as raised:
        model(x)
    text = str(raised.value)
    assert message in text and text.startswith(owner), text


def test_an_empty_batch_is_still_fine():
    block = SelfAttention2d(16)
    assert block(torch.ones(0, 16, 4, 4)).shape == (0, 16, 4, 4)


def test_half_precision_on_the_cpu_runs_forward_and_backward():
    model = create_model("vit_digits_patch4_16", stem="conv").half()
    x = torch.randn(2, 1, 16, 16).half()
    model(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float16 for p in model.parameters())


def test_another_dtype_is_fine_inside_autocast():
    block = SelfAttention2d(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(torch.randn(1, 16, 4, 4).bfloat16()).dtype == torch.bfloat16


def test_the_checks_hold_under_torch_compile():
    """A valid input compiles into one graph; a bad one gets the eager message (with graph breaks)."""
    block = SelfAttention2d(16).eval()
    x = torch.randn(1, 16, 5, 4)
    whole = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(whole(x), block(x))
    broken = torch.compile(block, backend="aot_eager")
    with pytest.raises(ValueError, match="empty grid"):
        broken(torch.randn(1, 16, 0, 4))
