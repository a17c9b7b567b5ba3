"""Every map of a model through every metric, with baselines, intervals, a table and a figure.

:func:`evaluate_maps` is what ``visattn evaluate-maps`` runs: named map methods
(:data:`visattn.explain.metrics.METHODS`) and three baselines that know nothing of the model — a random
map, a centre prior and the blurred input ("where the ink is") — scored by the pointing game,
deletion, insertion and the randomization test of :mod:`visattn.explain.metrics`. :func:`summarize`
gives each score's mean with a 95 % bootstrap interval; :func:`format_table` and
:func:`plot_curves` show them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from .._io import atomic_write, check_output
from .metrics import (
    METHODS,
    Baseline,
    MapMethod,
    attention_map,
    causal_metric,
    pointing_game,
    randomization_test,
)

__all__ = [
    "BASELINES",
    "METRICS",
    "MapEvaluation",
    "bootstrap_interval",
    "centre_map",
    "evaluate_maps",
    "format_randomization",
    "format_table",
    "ink_map",
    "plot_curves",
    "random_map",
    "summarize",
]

METRICS = ("pointing", "deletion", "insertion", "randomization")
BASELINES = ("random", "centre", "ink")
INTERVAL = "95% bootstrap percentile interval (2,000 resamples of the images, seed 0)"


# --- baselines ------------------------------------------------------------------------------


def random_map(batch: int, grid: tuple[int, int], seed: int = 0) -> Tensor:
    """Uniform noise ``(B, h, w)`` on ``grid`` (seeded): a map that knows nothing."""
    return torch.rand(batch, *grid, generator=torch.Generator().manual_seed(seed))


def centre_map(batch: int, size: tuple[int, int]) -> Tensor:
    """The centre prior ``(B, H, W)``: minus the squared distance of each pixel to the image centre."""
    height, width = size
    y = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    x = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    return -(y[:, None] ** 2 + x[None, :] ** 2).expand(batch, height, width)


def ink_map(images: Tensor, sigma: float = 2.0) -> Tensor:
    """Where the ink is: the channel mean of ``images (B, C, H, W)`` blurred with a Gaussian of
    ``sigma`` pixels → ``(B, H, W)`` (bright strokes on a dark background score high)."""
    side = min(images.shape[-2:])
    kernel = min(2 * int(3 * sigma) + 1, side - 1 if side % 2 == 0 else side)
    gray = images.mean(dim=1, keepdim=True)
    return (gaussian_blur(gray, kernel_size=kernel, sigma=sigma) if kernel > 1 else gray)[:, 0]


def _fixed(heatmaps: Tensor) -> MapMethod:
    """A map method that ignores the model (a baseline), for the randomization test."""
    return lambda model, images, target: heatmaps


# --- evaluation -----------------------------------------------------------------------------


@dataclass
class MapEvaluation:
    """Per-image scores of each row (a map method or a baseline).

    Attributes:
        scores: row → metric → ``(N,)`` scores (pointing: 1.0 hit / 0.0 miss; deletion, insertion:
            area under the curve; ``randomization``: ρ after the last block; ``randomization_all``:
            ρ after every part was re-initialized).
        curves: row → ``"deletion"``/``"insertion"`` → ``(N, steps + 1)`` probabilities.
        randomization: row → (steps, ``(len(steps), N)`` ρ, index of the last block).
        baselines: the rows that are baselines.
        predictions: ``(N,)`` the model's classes, the targets of deletion, insertion and gradients.
    """

    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    curves: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    randomization: dict[str, tuple[list[str], Tensor, int]] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)
    predictions: Tensor | None = None


def _chunked(method: str, layer: int | str, chunk: int) -> MapMethod:
    def run(model: nn.Module, images: Tensor, target: Tensor) -> Tensor:
        parts = [
            attention_map(model, images[s : s + chunk], method, target=target[s : s + chunk], layer=layer)
            for s in range(0, len(images), chunk)
        ]
        return torch.cat(parts)

    return run


def _check_request(methods: Sequence[str], metrics: Sequence[str], boxes: Tensor | None) -> None:
    for kind, asked, valid in (("method", methods, METHODS), ("metric", metrics, METRICS)):
        unknown = [name for name in asked if name not in valid]
        if unknown or not asked:
            raise ValueError(f"unknown {kind} {', '.join(unknown) or '(none given)'}; choose from {', '.join(valid)}")
    if "pointing" in metrics and boxes is None:
        raise ValueError("the pointing game needs the object boxes, and this data set has none; leave out 'pointing'")


def _applicable(model: nn.Module, images: Tensor, methods: Sequence[str], layer: int | str) -> None:
    """Try each method on one image, so a method that does not fit the model fails before the work."""
    for method in methods:
        try:
            attention_map(model, images[:1], method, layer=layer)
        except (ValueError, IndexError, RuntimeError) as err:
            raise ValueError(f"map method {method!r} does not apply to this model: {err}") from None


def _predict(model: nn.Module, images: Tensor, chunk: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(images[s : s + chunk]) for s in range(0, len(images), chunk)]).argmax(dim=-1)


def _row_maps(
    model: nn.Module, images: Tensor, target: Tensor, methods: Sequence[str], layer: int | str, chunk: int, seed: int
) -> tuple[dict[str, MapMethod], dict[str, Tensor]]:
    """Each row's map method and its maps on ``images``; baselines after the methods."""
    runners = {name: _chunked(name, layer, chunk) for name in methods}
    heatmaps = {name: runners[name](model, images, target) for name in methods}
    first = heatmaps[methods[0]]
    heatmaps["random"] = random_map(len(images), (first.shape[-2], first.shape[-1]), seed)
    heatmaps["centre"] = centre_map(len(images), (images.shape[-2], images.shape[-1]))
    heatmaps["ink"] = ink_map(images)
    runners.update({name: _fixed(heatmaps[name]) for name in BASELINES})
    return runners, heatmaps


def evaluate_maps(
    model: nn.Module,
    images: Tensor,
    *,
    methods: Sequence[str] = ("rollout", "grad_rollout"),
    metrics: Sequence[str] = METRICS,
    boxes: Tensor | None = None,
    layer: int | str = -1,
    steps: int = 32,
    baseline: Baseline = "blur",
    batch_size: int = 256,
    seed: int = 0,
) -> MapEvaluation:
    """Score each map method of ``model`` and the three baselines on ``images``.

    Args:
        model: the classifier, in eval mode.
        images: ``(N, C, H, W)`` as the model takes them.
        methods: names from :data:`visattn.explain.metrics.METHODS`; one that does not apply to the model
            (``"cls"`` without a class token, ``"rollout"`` on a CNN) raises ``ValueError`` first.
        metrics: names from :data:`METRICS`.
        boxes: ``(N, 4)`` object boxes (pixels, ``x1``/``y1`` exclusive), for ``"pointing"``.
        layer: the layer of ``"cls"`` and ``"received"``.
        steps, baseline, batch_size: of :func:`~visattn.explain.metrics.causal_metric` (deletion, insertion)
            (targets: the predicted classes).
        seed: of the random map and of the randomization test.

    The random baseline is uniform noise on the first method's grid; the centre prior and the
    ink map are on the pixels.
    """
    _check_request(methods, metrics, boxes)
    _applicable(model, images, methods, layer)
    chunk = max(1, min(64, batch_size))
    target = _predict(model, images, chunk)
    runners, heatmaps = _row_maps(model, images, target, methods, layer, chunk, seed)
    size = (images.shape[-2], images.shape[-1])
    result = MapEvaluation(baselines=list(BASELINES), predictions=target)
    for name, heatmap in heatmaps.items():
        scores = result.scores.setdefault(name, {})
        if "pointing" in metrics:
            assert boxes is not None  # _check_request asked for them
            scores["pointing"] = pointing_game(heatmap, boxes, size).double()
        for metric in ("deletion", "insertion"):
            if metric in metrics:
                scores[metric], curves = causal_metric(
                    model,
                    images,
                    heatmap,
                    mode=metric,
                    target=target,
                    steps=steps,
                    baseline=baseline,
                    batch_size=batch_size,
                    return_curves=True,
                )
                result.curves.setdefault(name, {})[metric] = curves
        if "randomization" in metrics:
            test = randomization_test(model, images, runners[name], target=target, seed=seed)
            result.randomization[name] = (test.steps, test.correlation, test.last_block)
            scores["randomization"] = test.correlation[test.last_block]
            scores["randomization_all"] = test.correlation[-1]
    return result


# --- summaries ------------------------------------------------------------------------------


def bootstrap_interval(scores: Tensor, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``scores (N,)`` and its 95 % bootstrap percentile interval ``(mean, low, high)``
    (NaN scores are left out)."""
    values = scores.detach().double().flatten()
    values = values[~values.isnan()]
    if values.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    picks = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(values.mean()), low, high


def summarize(result: MapEvaluation) -> dict:
    """A JSON-ready summary: each row's metrics as mean and interval, mean curves, mean ρ per step."""
    keys = ("mean", "low", "high")
    rows = {
        name: {metric: dict(zip(keys, bootstrap_interval(s), strict=True)) for metric, s in m.items()}
        for name, m in result.scores.items()
    }
    curves = {name: {k: c.mean(dim=0).tolist() for k, c in m.items()} for name, m in result.curves.items()}
    randomization = {
        name: {"steps": steps, "mean_rho": rho.nanmean(dim=1).tolist(), "last_block": last}
        for name, (steps, rho, last) in result.randomization.items()
    }
    return {
        "interval": INTERVAL,
        "baselines": result.baselines,
        "rows": rows,
        "curves": curves,
        "randomization": randomization,
    }


COLUMNS = {
    "pointing": "pointing game ↑",
    "deletion": "deletion AUC ↓",
    "insertion": "insertion AUC ↑",
    "randomization": "randomization ρ, last block ↓",
    "randomization_all": "randomization ρ, all ↓",
}


def format_table(summary: dict) -> str:
    """The summary as a Markdown table: one row per method or baseline, ``mean [low, high]``."""
    rows = summary["rows"]
    metrics = [m for m in COLUMNS if any(m in r for r in rows.values())]
    lines = ["| map | " + " | ".join(COLUMNS[m] for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in rows.items():
        label = f"{name} (baseline)" if name in summary["baselines"] else name
        cells = [f"{row[m]['mean']:.3f} [{row[m]['low']:.3f}, {row[m]['high']:.3f}]" for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_randomization(summary: dict) -> str:
    """Mean ρ after each step of the randomization test, one row per map (Markdown)."""
    tests = summary["randomization"]
    steps = next(iter(tests.values()))["steps"]
    lines = ["| map | " + " | ".join(f"+ {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for name, test in tests.items():
        lines.append(f"| {name} | " + " | ".join(f"{rho:.2f}" for rho in test["mean_rho"]) + " |")
    return "\n".join(lines)


def plot_curves(summary: dict, path: str | Path, title: str = "", force: bool = False) -> None:
    """The mean deletion and insertion curves of every row, side by side, as a PNG; an existing
    file at ``path`` is replaced only if it is a PNG or empty, or with ``force``."""
    check_output(path, "PNG", force=force)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("deletion", "insertion") if any(k in c for c in summary["curves"].values())]
    if not kinds:
        raise ValueError("no deletion or insertion curves to draw; ask for those metrics")
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, curves in summary["curves"].items():
            curve = torch.tensor(curves[kind])
            x = torch.linspace(0, 1, len(curve))
            dashed = "--" if name in summary["baselines"] else "-"
            auc = summary["rows"][name][kind]["mean"]
            ax.plot(x, curve, dashed, label=f"{name} (AUC {auc:.3f})")
        verb = "removed" if kind == "deletion" else "inserted"
        ax.set(xlabel=f"fraction of pixels {verb}, most-attended first", ylabel="probability of the class", ylim=(0, 1))
        ax.set_title(kind)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
