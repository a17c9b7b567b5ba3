"""Any named model with its weights: ``create_model``, plus a weights file for every name.

``create_model(name, pretrained_file=...)`` reads a file for timm and torchvision ViT names (and
converts it exactly). :func:`model_with_weights` accepts a file for every other name
``create_model`` builds as well — visattn's own names (``"vit_digits_patch4_16"``) and the
``"torchvision:…"`` / ``"timm:…"`` CNNs: the model is built and the file's tensors loaded with
every name and shape checked, so a file of another architecture is one ``ValueError`` that names
the file and the mismatch. The ``visattn overlay`` and ``visattn explore`` commands use it for
``--pretrained`` and ``--pretrained-file``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .._io import CheckpointError
from ..models.registry import create_model
from .peer_names import is_convertible_name
from .state_dict import load_state_dict_exactly, load_weights_file

__all__ = ["model_with_weights"]


def model_with_weights(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``create_model(name, **kwargs)`` with weights, for any name it accepts (eval mode).

    Args:
        name: anything :func:`visattn.create_model` builds: a timm/torchvision ViT name (tags
            too), visattn's own names, ``"torchvision:NAME"``, ``"timm:NAME"``.
        pretrained: the weights from timm's or torchvision's own download or cache.
        pretrained_file: a local ``.safetensors`` / ``.pth`` / ``.bin`` state dict (read without
            running pickled code), the files ``create_model(..., pretrained_file=...)`` reads;
            wins over ``pretrained``.
        kwargs: the model's keyword arguments.

    Raises:
        ValueError: the file does not fit the architecture (names the file, the model and the
            missing, unexpected or mis-shaped entries), or the name has no published weights.
    """
    if pretrained_file is None:
        return create_model(name, pretrained=pretrained, **kwargs).eval()
    path = Path(pretrained_file)
    try:
        if ":" not in name and is_convertible_name(name):
            return create_model(name, pretrained_file=path, **kwargs).eval()
        model = create_model(name, **kwargs)
        load_state_dict_exactly(model, load_weights_file(path), source=str(path))
    except CheckpointError:
        raise  # unreadable, truncated or unsafe: says so itself
    except ValueError as err:
        if not path.is_file():
            raise
        raise ValueError(f"pretrained_file {path} does not fit the architecture {name!r}: {err}") from err
    return model.eval()
