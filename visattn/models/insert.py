"""Put attention blocks (:class:`~visattn.SelfAttention2d` or a local family, by name) into an
existing CNN without changing its keys.

Design: the block for a site ``"layer3"`` is registered on the model's root under a new name
(``"layer3_attn"``; ``"features.6"`` gives ``"features_6_attn"``), and a forward hook on the site
runs it on the site's output. Nothing else in the model is replaced or renamed, so:

- the model keeps its class, its submodules, its parameter names and its state-dict keys; only the
  new blocks' keys are added (a checkpoint of the original loads with ``strict=False`` and reports
  exactly those as missing);
- the blocks are ordinary modules (``SelfAttention2d``, ``WindowAttention2d`` …) in
  ``model.named_modules()``;
- calling the site directly (``model.layer3(x)``) also runs its block, as a wrapper would;
- ``copy.deepcopy``, pickling, ``state_dict`` round trips, ``.to()`` and ``torch.compile`` carry the
  blocks along (the hook is an object holding the block, copied with the model).

Limit: tools that re-trace ``forward`` without running module hooks (``torch.fx``, e.g.
torchvision's ``create_feature_extractor``) do not see the blocks.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._utils import dry_forward, human_bytes
from ..layers.attention import GridAttentionCost, SelfAttention2d, check_heads
from ..layers.functional import attention_matrix_bytes
from ..layers.local import HaloAttention2d, NeighborhoodAttention2d, WindowAttention2d

__all__ = ["BLOCKS", "AttentionSite", "attention_sites", "format_sites", "hooked_blocks", "insert_attention"]

Preset = Literal["sagan", "non_local"]
#: the block of each ``insert_attention(preset=...)``
_PRESETS: dict[str | None, Callable[..., SelfAttention2d]] = {
    None: SelfAttention2d,
    "sagan": SelfAttention2d.sagan,
    "non_local": SelfAttention2d.non_local,
}
#: the attention families by the name ``insert_attention(block=...)`` and ``model.attention.block`` take
BLOCKS: dict[str, type[nn.Module]] = {
    "global": SelfAttention2d,
    "window": WindowAttention2d,
    "neighborhood": NeighborhoodAttention2d,
    "halo": HaloAttention2d,
}


def block_class(block: str | type[nn.Module]) -> type[nn.Module]:
    """The block class of ``block``: a name of :data:`BLOCKS` or a class taking ``(channels, **kwargs)``."""
    if isinstance(block, type):
        if not hasattr(block, "attention_cost"):
            raise ValueError(
                f"block={block.__name__} has no attention_cost(height, width); pass one of {sorted(BLOCKS)} "
                "or a grid attention class of visattn"
            )
        return block
    if block not in BLOCKS:
        close = difflib.get_close_matches(str(block), BLOCKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown attention block {block!r}{hint}; choose one of: {', '.join(BLOCKS)}")
    return BLOCKS[block]


def check_block_options(make: Callable[..., nn.Module], options: Mapping[str, Any]) -> None:
    """Refuse an option the block factory ``make`` (a class or a preset) does not take, naming
    the ones it does (a preset's ``**overrides`` are the class's options)."""
    known: list[str] = []
    for factory in (make, _class_of(make)):
        parameters = inspect.signature(factory).parameters.values()
        known += [
            p.name for p in parameters if p.name not in known and p.name != "channels" and p.kind != p.VAR_KEYWORD
        ]
    unknown = [name for name in options if name not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        name = getattr(make, "__qualname__", type(make).__name__)
        raise ValueError(f"{name} has no option {unknown[0]!r}{hint}; its options: {', '.join(known)}")


def _class_of(make: Callable[..., nn.Module]) -> type[nn.Module]:
    """The class a block factory builds: the factory itself, or the class of a preset classmethod."""
    owner = getattr(make, "__self__", make)
    return owner if isinstance(owner, type) else type(owner)


def _block_factory(block: str | type[nn.Module], preset: Preset | None) -> Callable[..., nn.Module]:
    """What builds one block: the class, or a ``SelfAttention2d`` preset (global attention only)."""
    if preset not in _PRESETS:
        raise ValueError(f"preset must be 'sagan', 'non_local' or None, got {preset!r}")
    cls = block_class(block)
    if preset is None:
        return cls
    if cls is not SelfAttention2d:
        raise ValueError(f"preset={preset!r} is a global attention block; it does not go with block={block!r}")
    return _PRESETS[preset]


class _RunBlock:
    """Forward hook: the site's output goes through ``block``.

    A plain object rather than a closure, so ``copy.deepcopy(model)`` gives the copy's hook the
    copy's block.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self.block(output)


def hooked_blocks(model: nn.Module) -> list[nn.Module]:
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
    block: str | type[nn.Module] = "global",
    preset: Preset | None = None,
    input_size: tuple[int, int, int] | None = None,
    **block_kwargs: Any,
) -> list[str]:
    """Put an attention block after each named submodule of ``model``, in place.

    Channels are found with one dry forward pass (eval mode, no gradients, BatchNorm statistics
    untouched). Every block starts as the exact identity (``γ = 0``, or a zero BatchNorm weight
    for ``preset="non_local"``), so the model's outputs are unchanged until it is trained.

    Args:
        model: a CNN (torchvision, timm or your own) whose root ``forward`` does not iterate over
            its children (so not a bare ``nn.Sequential``).
        at: one or more dotted module paths (``"layer3"``, ``"layer4.1"``, ``"features.6"``,
            ``"stages.2"``); each must output a ``(B, C, H, W)`` tensor.
        block: which family: a name of :data:`BLOCKS` (``"global"``: :class:`~visattn.SelfAttention2d`,
            the default) or a grid attention class built as ``block(channels, **block_kwargs)``.
        preset: ``"sagan"`` or ``"non_local"`` builds the block with that
            :class:`~visattn.SelfAttention2d` preset (``block_kwargs`` override it).
        input_size: ``(C, H, W)`` of the dry-run input; default: the first convolution's input
            channels at 64×64.
        **block_kwargs: passed to the block (``num_heads``, ``qk_channels``; ``kv_pool``, ``pos``,
            ``gate`` for global attention; ``window_size``, ``kernel_size`` … for the families).

    Returns:
        The module paths of the new blocks (``["layer3_attn", "layer4_attn"]``), in ``at`` order.

    Raises:
        ValueError: unknown path (with close matches), a path given twice or already holding a
            block, a site whose output is not 4-D, an unknown ``block`` or ``preset`` (or a preset
            with a local family), or a dry run that fails at ``input_size``.
    """
    paths = [at] if isinstance(at, str) else list(at)
    if not paths:
        raise ValueError("at is empty: name at least one submodule, e.g. at=['layer3']")
    if len(set(paths)) != len(paths):
        raise ValueError(f"at names a submodule more than once: {paths}")
    make = _block_factory(block, preset)
    check_block_options(make, block_kwargs)
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
                f"cannot put attention after {path!r}: an attention block needs a (B, C, H, W) output "
                f"and {path!r} gave {seen}. Pick a site from visattn.attention_sites(model)."
            )
        module = make(shape[1], **block_kwargs)
        if param is not None:
            module.to(device=param.device, dtype=param.dtype)
        name = _host_name(path)
        model.add_module(name, module)
        sites[path].register_forward_hook(_RunBlock(module))
        inserted.append(name)
    return inserted


@dataclass(frozen=True)
class AttentionSite:
    """A candidate place for a block and what attention there costs, per image.

    Attributes:
        path: the module path to pass to :func:`insert_attention`.
        kind: the module's class name.
        channels, height, width: its output ``C × H × W``.
        tokens: ``H·W`` queries; ``keys``: the keys of a query (after ``kv_pool``; a local
            family's window).
        materialized_bytes: the block's scores for one head of one image (the ``tokens × keys``
            matrix of global attention, which recording weights or an unfused non-local block
            stores; a local family's masked tiles).
        fused_bytes: what the fused path holds instead for one head of one image: queries, the
            keys and values it gathers, and output, at the block's widths.
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
    block: str | type[nn.Module] = "global",
    num_heads: int = 1,
    dtype: torch.dtype = torch.float32,
    leaves: bool = False,
    max_depth: int | None = None,
    **block_kwargs: Any,
) -> list[AttentionSite]:
    """List where an attention block could go and what it would cost there.

    One dry forward pass of a ``(1, *input_size)`` input records every submodule's output; those
    with a 4-D output are candidates, in the model's module order. Costs are those of the block
    :func:`insert_attention` would put there with the same ``block``, ``num_heads`` and
    ``block_kwargs`` (default widths: query/key/value ``C/8``).

    Args:
        model: the CNN (it is not changed).
        input_size: ``(C, H, W)`` of one image at the size you will run.
        block: the family (a name of :data:`BLOCKS`, or a class), as for :func:`insert_attention`.
        num_heads: heads of the planned block (the per-head widths and the FLOPs depend on it).
        dtype: element type for the byte counts.
        leaves: also list leaf modules (single convolutions, norms, activations); by default
            only containers (stages, blocks) are listed.
        max_depth: only paths with at most this many parts (``1``: ``"layer3"``; ``2``:
            ``"layer3.1"``); ``None`` lists all.
        **block_kwargs: the block's options (``kv_pool=2``, ``window_size=8`` …).

    Returns:
        :class:`AttentionSite` rows in module order.
    """
    check_heads(num_heads)
    cls = block_class(block)
    check_block_options(cls, {"num_heads": num_heads, **block_kwargs})
    modules = {
        path: module
        for path, module in model.named_modules()
        if path
        and (leaves or next(module.children(), None) is not None)
        and (max_depth is None or path.count(".") < max_depth)
        and not isinstance(module, tuple(BLOCKS.values()))
    }
    shapes = _output_shapes(model, modules, input_size)
    rows = []
    for path in modules:
        shape = shapes.get(path)
        if isinstance(shape, tuple) and len(shape) == 4:
            planned = cls(shape[1], num_heads=num_heads, **block_kwargs)
            rows.append(_site(path, type(modules[path]).__name__, shape, planned, dtype))
    return rows


def _site(path: str, kind: str, shape: tuple[int, ...], block: Any, dtype: torch.dtype) -> AttentionSite:
    """One row of :func:`attention_sites`: ``block`` (a planned block) on a ``shape`` output."""
    _, channels, height, width = shape
    cost: GridAttentionCost = block.attention_cost(height, width)
    element = torch.empty((), dtype=dtype).element_size()
    head_dim, v_head_dim = block.qk_channels // block.num_heads, block.v_channels // block.num_heads
    tokens = height * width
    return AttentionSite(
        path=path,
        kind=kind,
        channels=channels,
        height=height,
        width=width,
        tokens=tokens,
        keys=cost.keys,
        materialized_bytes=attention_matrix_bytes(1, 1, 1, cost.scores, dtype),
        fused_bytes=(tokens * (head_dim + v_head_dim) + cost.key_cells * (head_dim + v_head_dim)) * element,
        flops=2 * block.num_heads * cost.scores * (head_dim + v_head_dim),
    )


def format_sites(sites: Sequence[AttentionSite]) -> str:
    """A Markdown table of :func:`attention_sites` rows."""
    lines = [
        "| site | module | C × H × W | tokens | keys / query | scores / image / head "
        "| fused q,k,v,out / image / head | attention GFLOPs / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in sites:
        lines.append(
            f"| `{s.path}` | {s.kind} | {s.channels} × {s.height} × {s.width} | {s.tokens} | {s.keys} "
            f"| {human_bytes(s.materialized_bytes)} | {human_bytes(s.fused_bytes)} | {s.flops / 1e9:.3f} |"
        )
    return "\n".join(lines)
