"""``create_model("hf:PATH_OR_ID")``: a Hugging Face model folder or hub id, converted to visattn.

A folder (``config.json`` + ``model.safetensors``, as transformers' ``save_pretrained`` writes it) is read by
transformers' own ``from_pretrained`` without touching the network. A hub id goes through
transformers' loading and cache (``~/.cache/huggingface/hub``, ``$HF_HUB_CACHE``); offline
(``HF_HUB_OFFLINE=1``) only the cache is read, and without a cached copy one error says what to
download and where to put it. The model is then converted by :func:`~visattn.weights.hf.from_transformers`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..models.registry import register_source
from ..models.vit import VisionTransformer
from .converted_vit import reset_head
from .errors import PretrainedUnavailableError, UnsupportedModelError
from .hf import SUPPORTED_ARCHITECTURES, HFArchitecture, convert_parts, import_transformers

__all__ = ["hf_model"]

#: from_pretrained arguments that say where the files are (the others override config values)
_LOADING = ("revision", "cache_dir", "token", "subfolder", "force_download")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+|[\w.-]+")
_INTERPOLATION = {2: "bilinear", 3: "bicubic"}  # PIL's resampling codes in preprocessor_config.json


def hf_model(
    name: str,
    *,
    pretrained: bool = True,
    num_classes: int | None = None,
    in_chans: int | None = None,
    **hf_kwargs: Any,
) -> VisionTransformer:
    """A transformers ViT / DeiT / DINOv2 folder or hub id, with its weights, as a visattn model.

    Args:
        name: a folder written by transformers' ``save_pretrained`` (``config.json`` + weights), or a hub id
            such as ``"facebook/dinov2-small"``.
        pretrained: always loaded (an ``hf:`` name is a checkpoint); ``False`` is refused.
        num_classes: other than the checkpoint's: a fresh head on the converted backbone.
        in_chans: other than the checkpoint's: the patch filters adapted as timm does (one
            channel sums the RGB filters).
        hf_kwargs: passed to transformers' ``from_pretrained``: ``revision``, ``cache_dir``,
            ``token``, or config overrides such as ``attention_probs_dropout_prob=0.1``.

    Returns:
        The converted :class:`VisionTransformer` in train mode, with ``pretrained_cfg`` holding
        the checkpoint's normalization (``preprocessor_config.json``) when it has one.

    Raises:
        PretrainedUnavailableError: a hub id that is neither reachable nor cached (says what to
            download and where).
        FileNotFoundError: a path that is not a folder.
        UnsupportedModelError: an architecture or feature visattn does not convert (named).
    """
    if not pretrained:
        raise ValueError(
            f"hf:{name} names a checkpoint and loads its own weights; drop pretrained=False "
            "(for random weights convert transformers.AutoModel.from_config(config) with visattn.from_transformers)"
        )
    transformers = import_transformers()
    source, local_only = _locate(name)
    loading = {k: v for k, v in hf_kwargs.items() if k in _LOADING}
    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only, **loading)
        arch = _architecture(config, name)
        peer = getattr(transformers, arch.name).from_pretrained(source, local_files_only=local_only, **hf_kwargs)
    except OSError as err:
        if Path(source).is_dir():
            raise
        raise _unavailable(name, err) from err
    model = convert_parts(peer.config, peer.state_dict(), arch, in_chans=in_chans)
    preprocessing = _preprocessing(transformers, source, local_only, loading)
    if "input_size" in preprocessing:
        preprocessing["input_size"] = [model.patch_embed.in_chans, *preprocessing["input_size"]]
    model.pretrained_cfg = {**(model.pretrained_cfg or {}), **preprocessing, "source": f"hf:{name}"}
    return reset_head(model, num_classes).train()


def _locate(name: str) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, whether to stay off the network)`` for ``name``."""
    import huggingface_hub.constants

    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"hf:{name}: {folder / 'config.json'} does not exist; a Hugging Face model folder holds "
                "config.json and model.safetensors (as save_pretrained writes them)"
            )
        return str(folder), True
    if folder.exists():
        raise FileNotFoundError(f"hf:{name} is a file; pass the folder that holds config.json and the weights")
    if name.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(
            f"hf:{name}: no such folder (a Hugging Face model folder holds config.json and model.safetensors; "
            "a hub id looks like 'facebook/dinov2-small')"
        )
    return name, bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _architecture(config: Any, name: str) -> HFArchitecture:
    """The class to load: the config's ``architectures[0]``, or the base model of its ``model_type``."""
    named = (getattr(config, "architectures", None) or [None])[0]
    if named is None:
        named = next((a.name for a in SUPPORTED_ARCHITECTURES.values() if a.model_type == config.model_type), None)
    if named not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"hf:{name} is a {named or config.model_type!r} (model_type {config.model_type!r}); visattn converts "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    return SUPPORTED_ARCHITECTURES[named]


def _preprocessing(transformers: Any, source: str, local_only: bool, loading: dict[str, Any]) -> dict[str, Any]:
    """``mean``, ``std``, ``interpolation`` and ``input_size`` (``[H, W]``) from the checkpoint's
    ``preprocessor_config.json``, if it has one."""
    try:
        path = transformers.utils.cached_file(
            source, "preprocessor_config.json", local_files_only=local_only, **loading
        )
    except OSError:
        return {}
    if path is None:
        return {}
    pre = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg: dict[str, Any] = {
        key: list(pre[hf]) for key, hf in (("mean", "image_mean"), ("std", "image_std")) if hf in pre
    }
    if pre.get("resample") in _INTERPOLATION:
        cfg["interpolation"] = _INTERPOLATION[pre["resample"]]
    crop = pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size")
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        cfg["input_size"] = [crop["height"], crop["width"]]
    return cfg


def _unavailable(name: str, err: Exception) -> PretrainedUnavailableError:
    import huggingface_hub.constants

    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    folder = name.rsplit("/", 1)[-1]
    return PretrainedUnavailableError(
        f"could not load {name!r} from the Hugging Face hub: offline or unreachable, and not in the cache "
        f"{huggingface_hub.constants.HF_HUB_CACHE} ({reason}; no folder {Path(name).absolute()} either). "
        "On a machine with network access, download "
        f"it — `hf download {name} --local-dir {folder}`, or in Python "
        f"transformers.AutoModel.from_pretrained({name!r}).save_pretrained({folder!r}) — copy the folder "
        f"here and load it with visattn.create_model('hf:path/to/{folder}'); or copy that machine's hub "
        "cache into the cache folder above"
    )


register_source("hf", hf_model)
