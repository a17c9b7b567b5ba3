"""Are the maps right? The standard checks of an attention map against the model it explains.

===================  =====================================================  =====================
function             what it measures                                       returns
===================  =====================================================  =====================
pointing_game        the map's maximum lies in the object's box              ``(B,)`` bool
                     (Zhang et al. 2016)
deletion             the target's probability as the most-attended pixels    ``(B,)`` area under
                     are removed first (RISE, Petsiuk et al. 2018): low is    the curve
                     good
insertion            ... as they are inserted first into a blank: high is     ``(B,)`` area under
                     good                                                     the curve
randomization_test   rank correlation of the map with the maps of copies      :class:`Randomization
                     whose weights are re-initialized from the head down      Result`
                     (Adebayo et al. 2018): low is good
===================  =====================================================  =====================

Maps are ``(B, h, w)`` on a grid that covers the image (a patch grid, a feature-map grid, or the
pixels themselves); they are put on the pixels as :func:`visattn.explain.maps.to_image` puts them.
:func:`attention_map` makes such maps from a model with one of :data:`METHODS`; any other
``(B, h, w)`` map works the same (``visattn.explain.maps.query_map(...).mean(1)``, a CAM, a baseline).
Deletion and insertion are one measurement, :func:`causal_metric` (RISE's ``CausalMetric``),
with ``mode="deletion"`` or ``"insertion"``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from .._utils import require_finite
from ..layers.attention import RecordableAttention
from . import maps
from .maps import Target

__all__ = [
    "METHODS",
    "MapMethod",
    "RandomizationResult",
    "attention_map",
    "cascade",
    "causal_metric",
    "deletion",
    "insertion",
    "pointing_game",
    "randomization_test",
    "spearman",
]

#: the named map methods of :func:`attention_map`: those of :data:`~visattn.explain.maps.METHODS` without a query point
METHODS = tuple(name for name, spec in maps.METHODS.items() if not spec.needs_query)
#: a map method: ``(model, images (B, C, H, W), target (B,)) -> (B, h, w)`` on a grid covering the image
MapMethod = Callable[[nn.Module, Tensor, Tensor], Tensor]
Baseline = Literal["blur", "zero", "mean"] | Tensor


# --- maps from a model ----------------------------------------------------------------------


def attention_map(
    model: nn.Module, images: Tensor, method: str, *, target: Target = None, layer: int | str = -1
) -> Tensor:
    """One map per image, heads averaged, from one of :data:`METHODS`.

    ``"cls"``: :func:`~visattn.explain.maps.cls_attention` of ``layer``; ``"rollout"``:
    :func:`~visattn.explain.maps.rollout`; ``"grad_rollout"``: :func:`~visattn.explain.maps.grad_rollout` for
    ``target`` (default the predicted class); ``"received"``: :func:`~visattn.explain.maps.received` of
    ``layer`` (a ``SelfAttention2d`` or a Transformer layer).

    Args:
        model: the model (in the mode to explain, usually ``eval()``).
        images: ``(B, C, H, W)`` as the model takes them.

    Returns:
        ``(B, h, w)`` on the grid of the method (tokens, keys), or on the pixels ``(B, H, W)``
        where a pooled key grid reaches past the image.
    """
    if method not in METHODS:
        raise ValueError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    heat = maps.compute_map(model, method, images, target=target, layer=layer)
    values = heat.values.detach()
    if heat.extent is not None and tuple(heat.extent) != tuple(values.shape[-2:]):
        return maps.to_image(values, (images.shape[-2], images.shape[-1]), extent=heat.extent)
    return values


# --- checks ---------------------------------------------------------------------------------


def _check_maps(heatmaps: Tensor, batch: int | None, what: str = "maps") -> Tensor:
    if not isinstance(heatmaps, Tensor) or heatmaps.dim() != 3:
        shape = tuple(heatmaps.shape) if isinstance(heatmaps, Tensor) else type(heatmaps).__name__
        raise ValueError(f"{what} must be (B, h, w), one map per image, got {shape}; average heads with .mean(1)")
    if batch is not None and heatmaps.shape[0] != batch:
        raise ValueError(f"{what} hold {heatmaps.shape[0]} maps but there are {batch} images; give one map per image")
    heatmaps = heatmaps.detach()
    if not heatmaps.is_floating_point():
        heatmaps = heatmaps.float()
    require_finite(heatmaps, what, "a map must be finite to be ranked")
    return heatmaps


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, C, H, W) as the model takes them, got {shape}")
    return images


def _on_pixels(heatmaps: Tensor, size: tuple[int, int], extent: tuple[float, float] | None) -> Tensor:
    """``(B, h, w)`` → ``(B, H, W)``; maps already on the pixels are returned exactly as they are."""
    if tuple(heatmaps.shape[-2:]) == tuple(size) and extent is None:
        return heatmaps
    return maps.to_image(heatmaps, size, extent=extent)


def _targets(model: nn.Module, images: Tensor, target: Target, batch_size: int) -> Tensor:
    """``target`` as ``(B,)`` class indices; ``None``: the model's predicted classes."""
    if target is None:
        with torch.no_grad():
            logits = torch.cat([model(chunk) for chunk in images.split(batch_size)])
        return logits.argmax(dim=-1)
    target = torch.as_tensor(target, device=images.device).long()
    if target.dim() > 1 or target.numel() not in (1, len(images)):
        raise ValueError(f"target must be one class or one per image ({len(images)}), got shape {tuple(target.shape)}")
    return target.expand(len(images)).clone()


# --- the pointing game ----------------------------------------------------------------------


def _check_boxes(boxes: Tensor | Sequence, batch: int, size: tuple[int, int]) -> Tensor:
    boxes = torch.as_tensor(boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4) as x0, y0, x1, y1 in pixels, got shape {tuple(boxes.shape)}")
    if len(boxes) != batch:
        raise ValueError(f"{len(boxes)} boxes for {batch} maps; give one box per map")
    if boxes.is_floating_point() and not torch.equal(boxes, boxes.round()):
        raise ValueError("boxes must be whole pixel coordinates (x1, y1 exclusive)")
    boxes = boxes.long()
    height, width = size
    x0, y0, x1, y1 = boxes.unbind(1)
    bad = (x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height) | (x1 <= x0) | (y1 <= y0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"box {i} {tuple(boxes[i].tolist())} is empty or outside the {width}×{height} image; boxes are "
            f"x0, y0, x1, y1 with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (x1, y1 exclusive)"
        )
    return boxes


def pointing_game(
    heatmaps: Tensor,
    boxes: Tensor | Sequence,
    image_size: tuple[int, int],
    tolerance: float = 0,
    *,
    extent: tuple[float, float] | None = None,
) -> Tensor:
    """Whether each map's maximum falls on its object (Zhang et al. 2016, "Top-down Neural
    Attention by Excitation Backprop"; they allow a tolerance of 15 pixels).

    Args:
        heatmaps: ``(B, h, w)`` on a grid covering the image; put on the pixels as
            :func:`visattn.explain.maps.to_image` does (``extent`` as there). The maximum pixel is the
            first in row-major order where several tie.
        boxes: ``(B, 4)`` ``x0, y0, x1, y1`` in pixels, ``x1`` and ``y1`` exclusive.
        image_size: ``(H, W)`` of the image.
        tolerance: a maximum within this Euclidean distance (pixels) of the box also hits.

    Returns:
        ``(B,)`` bool.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be (H, W) with positive sides, got {tuple(image_size)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    heatmaps = _check_maps(heatmaps, None)
    boxes = _check_boxes(boxes, len(heatmaps), (height, width)).to(heatmaps.device)
    peak = _on_pixels(heatmaps, (height, width), extent).flatten(1).argmax(dim=1)
    y, x = peak // width, peak % width
    x0, y0, x1, y1 = boxes.unbind(1)
    dx = (x0 - x).clamp(min=0) + (x - (x1 - 1)).clamp(min=0)
    dy = (y0 - y).clamp(min=0) + (y - (y1 - 1)).clamp(min=0)
    return (dx**2 + dy**2).double() <= float(tolerance) ** 2


# --- deletion and insertion (RISE) ----------------------------------------------------------


def _baseline_images(images: Tensor, baseline: Baseline) -> Tensor:
    """What removed pixels become: RISE's blur (σ = 5 px, 11 px kernel), zeros, the image mean or a tensor."""
    if isinstance(baseline, Tensor):
        try:
            return baseline.to(images).broadcast_to(images.shape)
        except RuntimeError:
            raise ValueError(
                f"a baseline tensor must broadcast to the images {tuple(images.shape)}, got {tuple(baseline.shape)}"
            ) from None
    if baseline == "blur":
        side = min(images.shape[-2:])
        kernel = min(11, side - 1 if side % 2 == 0 else side)
        return gaussian_blur(images, kernel_size=kernel, sigma=5.0) if kernel > 1 else images.clone()
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "mean":
        return images.mean(dim=(-2, -1), keepdim=True).expand_as(images)
    raise ValueError(f"baseline must be 'blur', 'zero', 'mean' or a tensor, got {baseline!r}")


def _descending_ranks(pixels: Tensor) -> Tensor:
    """``(B, P)`` → each pixel's place when sorted most-attended first (ties: row-major order)."""
    order = pixels.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels.shape[1], device=pixels.device).expand_as(order))
    return ranks


def _curves(
    model: nn.Module,
    images: Tensor,
    heatmaps: Tensor,
    *,
    insert: bool,
    target: Target,
    steps: int,
    baseline: Baseline,
    batch_size: int,
    extent: tuple[float, float] | None,
) -> Tensor:
    """The target's probability after ``0, P/steps, ..., P`` of the ``P`` pixels changed: ``(B, steps + 1)``."""
    images = _check_images(images)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive whole number, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch, _, height, width = images.shape
    heatmaps = _check_maps(heatmaps, batch).to(images.device)
    ranks = _descending_ranks(_on_pixels(heatmaps, (height, width), extent).reshape(batch, -1))
    target = _targets(model, images, target, batch_size)
    blank = _baseline_images(images, baseline)
    start, end = (blank, images) if insert else (images, blank)  # what unchanged / changed pixels show
    counts = torch.arange(steps + 1, device=images.device) * (height * width) // steps
    pairs = torch.arange(batch * (steps + 1), device=images.device)
    probs = torch.empty(len(pairs), device=images.device)
    with torch.no_grad():
        for chunk in pairs.split(batch_size):
            i, k = chunk // (steps + 1), chunk % (steps + 1)
            changed = (ranks[i] < counts[k, None]).view(len(chunk), 1, height, width)
            logits = model(torch.where(changed, end[i], start[i]))
            probs[chunk] = logits.float().softmax(dim=-1).gather(1, target[i, None])[:, 0]
    return probs.view(batch, steps + 1)


def _area(curves: Tensor) -> Tensor:
    """Trapezoidal area under ``(B, steps + 1)`` curves over ``[0, 1]``."""
    return (curves[:, 1:] + curves[:, :-1]).sum(dim=1) / (2 * (curves.shape[1] - 1))


def causal_metric(
    model: nn.Module,
    images: Tensor,
    heatmaps: Tensor,
    *,
    mode: Literal["deletion", "insertion"],
    target: Target = None,
    steps: int = 32,
    baseline: Baseline = "blur",
    batch_size: int = 256,
    extent: tuple[float, float] | None = None,
    return_curves: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The deletion and insertion metrics of RISE (Petsiuk et al. 2018; their ``CausalMetric``).

    ``"deletion"``: remove pixels most-attended first and follow the target's softmax
    probability; a map that found the evidence makes it fall fast: **lower is better**.
    ``"insertion"``: start from the baseline image and put the image's pixels back
    most-attended first: **higher is better** (step 0 is the baseline image, the last step the
    image itself).

    Args:
        model: the classifier (in the mode to evaluate, usually ``eval()``).
        images: ``(B, C, H, W)`` as the model takes them (normalized).
        heatmaps: ``(B, h, w)`` on a grid covering the image (``extent`` as in
            :func:`visattn.explain.maps.to_image`); pixels are ranked by their value, ties in row-major order.
        mode: ``"deletion"`` or ``"insertion"``.
        target: class per image (an int for all, or ``B``); default the predicted class.
        steps: the curve has ``steps + 1`` points; step ``k`` has changed ``k·P // steps`` of the
            ``P`` pixels (all channels of a pixel together). ``B·(steps + 1)`` forward passes.
        baseline: what a removed pixel becomes: ``"blur"`` (the image blurred with a Gaussian,
            σ = 5 px, as RISE), ``"zero"``, ``"mean"`` (each image's per-channel mean) or a tensor
            broadcastable to ``images``.
        batch_size: images per forward pass.
        return_curves: also return the curves.

    Returns:
        ``(B,)`` area under the curve (trapezoid over the changed fraction ``[0, 1]``), and the
        curves ``(B, steps + 1)`` with ``return_curves=True``.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    curves = _curves(
        model,
        images,
        heatmaps,
        insert=mode == "insertion",
        target=target,
        steps=steps,
        baseline=baseline,
        batch_size=batch_size,
        extent=extent,
    )
    return (_area(curves), curves) if return_curves else _area(curves)


def deletion(model: nn.Module, images: Tensor, heatmaps: Tensor, **options: Any) -> Tensor | tuple[Tensor, Tensor]:
    """RISE's deletion metric, lower is better: :func:`causal_metric` with ``mode="deletion"``
    (the same keyword arguments)."""
    return causal_metric(model, images, heatmaps, mode="deletion", **options)


def insertion(model: nn.Module, images: Tensor, heatmaps: Tensor, **options: Any) -> Tensor | tuple[Tensor, Tensor]:
    """RISE's insertion metric, higher is better: :func:`causal_metric` with ``mode="insertion"``
    (the same keyword arguments)."""
    return causal_metric(model, images, heatmaps, mode="insertion", **options)


# --- the model-parameter randomization test -------------------------------------------------


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks ``0 … N-1`` along the last dimension of ``(B, N)``, tied values sharing their mean rank."""
    batch, n = values.shape
    order = values.argsort(dim=1, stable=True)
    ordered = values.gather(1, order)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = (new.cumsum(dim=1) - 1 + torch.arange(batch, device=values.device)[:, None] * n).flatten()
    places = torch.arange(n, dtype=torch.float64, device=values.device).repeat(batch)
    total = torch.zeros(batch * n, dtype=torch.float64, device=values.device).index_add_(0, group, places)
    count = torch.zeros_like(total).index_add_(0, group, torch.ones_like(places))
    mean_place = (total[group] / count[group]).view(batch, n)
    return torch.empty_like(mean_place).scatter_(1, order, mean_place)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation of each pair of maps ``(B, ...)`` → ``(B,)`` float64.

    Ties get their average rank (as ``scipy.stats.spearmanr``). A constant map has no ranking:
    its correlation is NaN.
    """
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"spearman compares maps of one shape (B, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = _average_ranks(a.detach().flatten(1).double())
    rb = _average_ranks(b.detach().flatten(1).double())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / ((ra**2).sum(dim=1) * (rb**2).sum(dim=1)).sqrt()


class RandomizationResult(NamedTuple):
    """What :func:`randomization_test` found.

    Attributes:
        steps: what each step re-initialized, head first (each step keeps the earlier ones).
        correlation: ``(len(steps), B)`` Spearman's ρ between the trained model's map and the
            map after each step.
        last_block: index into ``steps`` of the first step that re-initializes an attention module:
            the model's last attention block (``0`` when no step does).
    """

    steps: list[str]
    correlation: Tensor
    last_block: int


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's children with parameters; ``nn.Sequential``/``nn.ModuleList`` children are
    opened into their blocks (``blocks.0``, ``layer4.1``)."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential | nn.ModuleList):
            units += [(f"{name}.{sub}", block) for sub, block in child.named_children()]
        else:
            units.append((name, child))
    return [(name, m) for name, m in units if next(m.parameters(), None) is not None]


def cascade(model: nn.Module, images: Tensor) -> list[tuple[str, list[nn.Module], list[nn.Parameter]]]:
    """The model's parts in the order :func:`randomization_test` re-initializes them: the order
    in which one forward pass on ``images[:1]`` calls them, reversed (head first).

    Each part is ``(name, modules, parameters of the model itself)``; the model's own parameters
    (class token, positions) go with the part that runs first (the patch embedding).
    """
    units = _units(model)
    calls: dict[str, int] = {}

    def called(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:  # returns None: a pre-hook's return value would replace the input
            calls.setdefault(name, len(calls))

        return hook

    hooks = [module.register_forward_pre_hook(called(name)) for name, module in units]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    ran = sorted((calls[name], name, module) for name, module in units if name in calls)
    if not ran:
        raise ValueError("the randomization test found no part of the model with parameters that runs in forward")
    own = list(model.parameters(recurse=False))
    parts: list[tuple[str, list[nn.Module], list[nn.Parameter]]] = [(name, [module], []) for _, name, module in ran]
    if own:
        names = ", ".join(n for n, _ in model.named_parameters(recurse=False))
        parts[0] = (f"{parts[0][0]} + {names}", parts[0][1], own)
    return parts[::-1]


def _reinitialize(modules: list[nn.Module], parameters: list[nn.Parameter]) -> None:
    """Each submodule's own ``reset_parameters()`` (PyTorch's initialization); parameters no such
    module owns (class token, positions, gates, layer scales) get a truncated normal (σ = 0.02)."""
    covered: set[int] = set()
    for module in modules:
        for sub in module.modules():
            reset_parameters = getattr(sub, "reset_parameters", None)
            if callable(reset_parameters):
                reset_parameters()
                covered.update(id(p) for p in sub.parameters(recurse=False))
    rest = [p for m in modules for p in m.parameters() if id(p) not in covered] + list(parameters)
    with torch.no_grad():
        for param in rest:
            nn.init.trunc_normal_(param, std=0.02)


def _method(method: str | MapMethod) -> MapMethod:
    if callable(method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)} or pass a callable")
    return lambda model, images, target: attention_map(model, images, method, target=target)


def randomization_test(
    model: nn.Module,
    images: Tensor,
    method: str | MapMethod,
    *,
    target: Target = None,
    seed: int = 0,
) -> RandomizationResult:
    """The cascading model-parameter randomization test (Adebayo et al. 2018, "Sanity Checks
    for Saliency Maps"), on a copy of ``model`` (``model`` itself is not changed).

    From the head down, one part at a time (:func:`cascade`: head, final norm, each block from
    the last to the first, the patch embedding with the class token and positions), the copy's
    weights are re-initialized (each layer's ``reset_parameters()``; other parameters truncated
    normal, σ = 0.02) and the map recomputed. A map that explains the model must change: its
    rank correlation with the trained model's map should fall. A map that stays the same while
    the weights are destroyed does not explain the model.

    Args:
        model: the trained model (in the mode to explain, usually ``eval()``).
        images: ``(B, C, H, W)``.
        method: a name of :data:`METHODS` or a :data:`MapMethod` ``(model, images, target) -> (B, h, w)``.
        target: the class to explain, kept through every step (default the trained model's prediction).
        seed: seed of the re-initialization (the global RNG is left as it was).

    Returns:
        :class:`RandomizationResult`; ρ is NaN where a map is constant.
    """
    images = _check_images(images)
    target = _targets(model, images, target, len(images))
    method = _method(method)
    trained = _check_maps(method(model, images, target), len(images), "the trained model's maps")
    copied = copy.deepcopy(model)
    parts = cascade(copied, images)
    devices = sorted({p.device.index or 0 for p in copied.parameters() if p.is_cuda})
    steps, rhos = [], []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, modules, parameters in parts:
            _reinitialize(modules, parameters)
            after = _check_maps(method(copied, images, target), len(images), f"the maps after re-initializing {name}")
            steps.append(name)
            rhos.append(spearman(trained, after))
    attends = [i for i, (_, modules, _) in enumerate(parts) if _has_attention(modules)]
    return RandomizationResult(steps, torch.stack(rhos), attends[0] if attends else 0)


def _has_attention(modules: list[nn.Module]) -> bool:
    return any(isinstance(sub, RecordableAttention) for module in modules for sub in module.modules())
