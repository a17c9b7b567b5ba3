"""Put :class:`~visattn.SelfAttention2d` blocks into an existing CNN without changing its keys.

Design: the block for a site ``"layer3"`` is registered on the model's root under a new name
(``"layer3_attn"``; ``"features.6"`` gives ``"features_6_attn"``), and a forward hook on the site
runs it on the site's output. Nothing else in the model is replaced or renamed, so:

- the model keeps its class, its submodules, its parameter names and its state-dict keys; only the
  new blocks' keys are added (a checkpoint of the original loads with ``strict=False`` and reports
  exactly those as missing);
- the blocks are ordinary ``SelfAttention2d`` modules in ``model.named_modules()``;
- calling the site directly (``model.layer3(x)``) also runs its block, as a wrapper would;
- ``copy.deepcopy``, pickling, ``state_dict`` round trips, ``.to()`` and ``torch.compile`` carry the
  blocks along (the hook is an object holding the block, copied with the model).

Limit: tools that re-trace ``forward`` without running module hooks (``torch.fx``, e.g.
torchvision's ``create_feature_extractor``) do not see the blocks.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._utils import check_range, dry_forward, human_bytes
from ..layers.attention import SelfAttention2d, check_heads, default_qk_channels, pooled_grid
from ..layers.functional import attention_matrix_bytes

__all__ = ["AttentionSite", "attention_sites", "format_sites", "hooked_blocks", "insert_attention"]

Preset = Literal["sagan", "non_local"]
#: the block of each ``insert_attention(preset=...)``
_PRESETS: dict[str | None, Callable[..., SelfAttention2d]] = {
    None: SelfAttention2d,
    "sagan": SelfAttention2d.sagan,
    "non_local": SelfAttention2d.non_local,
}


class _RunBlock:
    """Forward hook: the site's output goes through ``block``.

    A plain object rather than a closure, so ``copy.deepcopy(model)`` gives the copy's hook the
    copy's block.
    """

    def __init__(self, block: SelfAttention2d) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self.block(output)


def hooked_blocks(model: nn.Module) -> list[SelfAttention2d]:
    """The blocks :func:`insert_attention` hooked onto submodules of ``model``, in module order."""
    return [
        hook.block
        for module in model.modules()
        for hook in module._forward_hooks.values()
        if isinstance(hook, _RunBlock)
    ]


def _host_name(path: str) -> str:
    return path.replace(".", "_") + "_attn"


def _resolve(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Module]:
    """Dotted paths → submodules, with close matches in the error for an unknown path."""
    named = dict(model.named_modules())
    found = {}
    for path in paths:
        if path not in named or path == "":
            close = difflib.get_close_matches(path, [n for n in named if n], n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(
                f"{type(model).__name__} has no submodule {path!r}{hint}. "
                "List the candidates with visattn.attention_sites(model)."
            )
        found[path] = named[path]
    return found


def _guess_in_chans(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(
        f"cannot tell the input channels of {type(model).__name__} (it has no Conv2d); pass input_size=(C, H, W)"
    )


def _output_shapes(
    model: nn.Module, modules: dict[str, nn.Module], input_size: tuple[int, int, int]
) -> dict[str, tuple[int, ...] | str]:
    """One dry forward pass of a ``(1, *input_size)`` zero image; each module's first output shape.

    A module whose output is not a tensor maps to a description of what it returned.
    """
    seen: dict[str, tuple[int, ...] | str] = {}

    def recorder(path: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if path not in seen:
                is_tensor = isinstance(output, Tensor)
                seen[path] = tuple(output.shape) if is_tensor else f"a {type(output).__name__}"

        return hook

    handles = [m.register_forward_hook(recorder(p)) for p, m in modules.items()]
    try:
        dry_forward(model, input_size)
    except Exception as error:
        raise ValueError(
            f"the dry forward pass of {type(model).__name__} on a {(1, *input_size)} input failed "
            f"({error}); pass input_size=(C, H, W) that the model accepts"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return seen


def insert_attention(
    model: nn.Module,
    at: str | Sequence[str],
    *,
    preset: Preset | None = None,
    input_size: tuple[int, int, int] | None = None,
    **block_kwargs: Any,
) -> list[str]:
    """Put a :class:`~visattn.SelfAttention2d` after each named submodule of ``model``, in place.

    Channels are found with one dry forward pass (eval mode, no gradients, BatchNorm statistics
    untouched). Every block starts as the exact identity (``γ = 0``, or a zero BatchNorm weight
    for ``preset="non_local"``), so the model's outputs are unchanged until it is trained.

    Args:
        model: a CNN (torchvision, timm or your own) whose root ``forward`` does not iterate over
            its children (so not a bare ``nn.Sequential``).
        at: one or more dotted module paths (``"layer3"``, ``"layer4.1"``, ``"features.6"``,
            ``"stages.2"``); each must output a ``(B, C, H, W)`` tensor.
        preset: ``"sagan"`` or ``"non_local"`` builds the block with that
            :class:`~visattn.SelfAttention2d` preset (``block_kwargs`` override it).
        input_size: ``(C, H, W)`` of the dry-run input; default: the first convolution's input
            channels at 64×64.
        **block_kwargs: passed to :class:`~visattn.SelfAttention2d` (``num_heads``,
            ``qk_channels``, ``kv_pool``, ``pos``, ``gate`` …).

    Returns:
        The module paths of the new blocks (``["layer3_attn", "layer4_attn"]``), in ``at`` order.

    Raises:
        ValueError: unknown path (with close matches), a path given twice or already holding a
            block, a site whose output is not 4-D, a bad ``preset``, or a dry run that fails at
            ``input_size``.
    """
    paths = [at] if isinstance(at, str) else list(at)
    if not paths:
        raise ValueError("at is empty: name at least one submodule, e.g. at=['layer3']")
    if len(set(paths)) != len(paths):
        raise ValueError(f"at names a submodule more than once: {paths}")
    if preset not in (None, "sagan", "non_local"):
        raise ValueError(f"preset must be 'sagan', 'non_local' or None, got {preset!r}")
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"insert_attention needs a model whose forward does not run all its children; "
            f"the root is a {type(model).__name__}. Wrap it in a module with its own forward, "
            "or put SelfAttention2d into the Sequential yourself."
        )
    sites = _resolve(model, paths)
    for path in paths:
        name = _host_name(path)
        if hasattr(model, name):
            raise ValueError(f"{type(model).__name__} already has {name!r}: attention at {path!r} was inserted before")
    if input_size is None:
        input_size = (_guess_in_chans(model), 64, 64)
    shapes = _output_shapes(model, sites, input_size)

    param = next(model.parameters(), None)
    inserted = []
    for path in paths:
        shape = shapes.get(path, "nothing (it was not called)")
        if not isinstance(shape, tuple) or len(shape) != 4:
            seen = f"shape {shape}" if isinstance(shape, tuple) else shape
            raise ValueError(
                f"cannot put attention after {path!r}: SelfAttention2d needs a (B, C, H, W) output "
                f"and {path!r} gave {seen}. Pick a site from visattn.attention_sites(model)."
            )
        make = _PRESETS[preset]
        block = make(shape[1], **block_kwargs)
        if param is not None:
            block.to(device=param.device, dtype=param.dtype)
        name = _host_name(path)
        model.add_module(name, block)
        sites[path].register_forward_hook(_RunBlock(block))
        inserted.append(name)
    return inserted


@dataclass(frozen=True)
class AttentionSite:
    """A candidate place for a block and what attention there costs, per image.

    Attributes:
        path: the module path to pass to :func:`insert_attention`.
        kind: the module's class name.
        channels, height, width: its output ``C × H × W``.
        tokens: ``H·W`` queries; ``keys``: keys after ``kv_pool``.
        materialized_bytes: the ``tokens × keys`` weight matrix for one head of one image (what
            recording weights, or an unfused non-local block, stores).
        fused_bytes: what the fused path holds instead for one head of one image: queries, keys,
            values and output at the default widths (``C/8`` each, split over the heads).
        flops: multiply-adds ×2 of ``q kᵀ`` and ``weights · v`` over all heads.
    """

    path: str
    kind: str
    channels: int
    height: int
    width: int
    tokens: int
    keys: int
    materialized_bytes: int
    fused_bytes: int
    flops: int


def attention_sites(
    model: nn.Module,
    input_size: tuple[int, int, int] = (3, 224, 224),
    *,
    num_heads: int = 1,
    kv_pool: int = 1,
    dtype: torch.dtype = torch.float32,
    leaves: bool = False,
    max_depth: int | None = None,
) -> list[AttentionSite]:
    """List where a :class:`~visattn.SelfAttention2d` could go and what it would cost.

    One dry forward pass of a ``(1, *input_size)`` input records every submodule's output; those
    with a 4-D output are candidates, in the model's module order. Costs use the block's defaults
    (query/key/value width ``C/8``) with ``num_heads`` heads and keys pooled by ``kv_pool``.

    Args:
        model: the CNN (it is not changed).
        input_size: ``(C, H, W)`` of one image at the size you will run.
        num_heads: heads of the planned block (the per-head widths and the FLOPs depend on it).
        kv_pool: key/value pooling of the planned block.
        dtype: element type for the byte counts.
        leaves: also list leaf modules (single convolutions, norms, activations); by default
            only containers (stages, blocks) are listed.
        max_depth: only paths with at most this many parts (``1``: ``"layer3"``; ``2``:
            ``"layer3.1"``); ``None`` lists all.

    Returns:
        :class:`AttentionSite` rows in module order.
    """
    check_heads(num_heads)
    check_range("kv_pool", kv_pool, at_least=1, integer=True)
    element = torch.empty((), dtype=dtype).element_size()
    modules = {
        path: module
        for path, module in model.named_modules()
        if path
        and (leaves or next(module.children(), None) is not None)
        and (max_depth is None or path.count(".") < max_depth)
        and not isinstance(module, SelfAttention2d)
    }
    shapes = _output_shapes(model, modules, input_size)
    rows = []
    for path in modules:
        shape = shapes.get(path)
        if not isinstance(shape, tuple) or len(shape) != 4:
            continue
        _, channels, height, width = shape
        head_dim = default_qk_channels(channels, num_heads) // num_heads
        tokens = height * width
        keys = math.prod(pooled_grid(height, width, kv_pool))
        rows.append(
            AttentionSite(
                path=path,
                kind=type(modules[path]).__name__,
                channels=channels,
                height=height,
                width=width,
                tokens=tokens,
                keys=keys,
                materialized_bytes=attention_matrix_bytes(1, 1, tokens, keys, dtype),
                fused_bytes=(2 * tokens + 2 * keys) * head_dim * element,
                flops=2 * 2 * num_heads * tokens * keys * head_dim,
            )
        )
    return rows


def format_sites(sites: Sequence[AttentionSite]) -> str:
    """A Markdown table of :func:`attention_sites` rows."""
    lines = [
        "| site | module | C × H × W | tokens | keys | weights matrix / image / head "
        "| fused q,k,v,out / image / head | attention GFLOPs / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sites:
        lines.append(
            f"| `{s.path}` | {s.kind} | {s.channels} × {s.height} × {s.width} | {s.tokens} | {s.keys} "
            f"| {human_bytes(s.materialized_bytes)} | {human_bytes(s.fused_bytes)} | {s.flops / 1e9:.3f} |"
        )
    return "\n".join(lines)
