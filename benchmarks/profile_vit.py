"""Where a ViT's time goes: ``python -m benchmarks.profile_vit [--model NAME] [--batch 8]``.

Runs PyTorch's profiler over one inference forward and one training step (forward, loss,
backward, AdamW step) of visattn's and timm's ViT with the same weights (``benchmarks.vit``), in
fp32 and under bf16 autocast, and prints the share of the operators' own (self) CPU time per
kind of work — matrix products, attention (forward and backward), GELU, layer norm, copies and
dtype casts, the optimizer, other element-wise work — as a Markdown table, with the attention
path visattn took. Shares, not times, are the figure: they hold on a busy machine too.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from visattn.profiling import CHUNKED_KERNELS, FUSED_KERNELS, UNFUSED_KERNELS

from . import vit
from .common import Config, bf16_enabled, markdown_table

#: kind of work → operator names (the profiler's keys); anything else is "other"
KINDS = {
    "matrix products": {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"},
    "attention forward": set(FUSED_KERNELS | UNFUSED_KERNELS) | {"visattn::chunked_attention"},
    "attention backward": {
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_scaled_dot_product_flash_attention_backward",
        "aten::_scaled_dot_product_efficient_attention_backward",
        "visattn::chunked_attention_backward",
    },
    "convolution (patch embedding)": {"aten::mkldnn_convolution", "aten::convolution_backward"},
    "GELU": {"aten::gelu", "aten::gelu_backward"},
    "layer norm": {"aten::native_layer_norm", "aten::native_layer_norm_backward"},
    "softmax (loss)": {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::_softmax"},
    "copies and dtype casts": {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"},
    "optimizer (AdamW)": {"aten::_fused_adamw_"},  # and every aten::_foreach_* (see _kind)
    "element-wise (add, mul, sum, ...)": {
        "aten::add",
        "aten::add_",
        "aten::mul",
        "aten::mul_",
        "aten::sum",
        "aten::div",
        "aten::fill_",
        "aten::zero_",
    },
}
#: the attention operators whose names tell which path visattn took
_PATHS = FUSED_KERNELS | UNFUSED_KERNELS | CHUNKED_KERNELS


def _kind(event) -> str:
    """The kind of an operator; anything run inside an attention operator (visattn's chunked
    path is made of matrix products and element-wise ones) is that attention operator's."""
    outer = event
    while outer.cpu_parent is not None:
        outer = outer.cpu_parent
        if outer.name in CHUNKED_KERNELS:
            event = outer
    if event.name.startswith("aten::_foreach_"):
        return "optimizer (AdamW)"
    return next((k for k, names in KINDS.items() if event.name in names), "other")


def breakdown(fn) -> tuple[dict[str, float], float, list[str]]:
    """Share of self CPU time per kind of work, total self CPU seconds, attention operators seen."""
    fn()  # warm-up (and, for visattn's "auto" path, the one-time measurement)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.events():
        by_kind[_kind(event)] += event.self_cpu_time_total
    seen = sorted({e.name for e in prof.events() if e.name in _PATHS})
    total = sum(by_kind.values())
    return {k: v / total for k, v in by_kind.items()}, total / 1e6, seen


def rows(model: str, batch: int, dtypes: list[torch.dtype]) -> list[dict]:
    pair = vit.make_pair(model, "cpu")
    x, y = vit.make_batch(model, "cpu", batch)
    out = []
    for dtype in dtypes:
        for mode in vit.MODES:
            for lib, module in pair.items():
                shares, seconds, seen = breakdown(vit.step(module, x, y, mode, dtype, "cpu"))
                row = {"case": f"{str(dtype).removeprefix('torch.')} {mode}", "lib": lib, "self_s": seconds}
                row.update({kind: 100 * shares.get(kind, 0.0) for kind in [*KINDS, "other"]})
                row["attention path"] = ", ".join(n.split("::")[1] for n in seen)
                out.append(row)
                print(f"  {row['case']} {lib} done", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", choices=sorted(vit.MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)

    use_bf16, why_not = bf16_enabled(Config(bf16=args.bf16))
    dtypes = [torch.float32] + ([torch.bfloat16] if use_bf16 else [])
    table = rows(args.model, args.batch, dtypes)
    columns = [("case", "case"), ("lib", "library"), ("self_s", "self CPU s")]
    columns += [(kind, f"% {kind}") for kind in [*KINDS, "other"]] + [("attention path", "attention path")]
    print(f"\n{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(markdown_table(columns, table))
    if not use_bf16:
        print(f"bf16: {why_not}")


if __name__ == "__main__":
    main()
