"""Layer 3: weights in and out.

``timm_vit`` and ``torchvision_vit`` (timm and torchvision ViTs, exactly), ``peer_names`` (their
names for ``create_model``; registered when this package is imported), ``state_dict`` (reading,
renaming and checked loading of state dicts), ``converted_vit`` (the ``VisionTransformer`` a
converter builds), ``errors`` (what conversion refuses), ``hf`` (Hugging Face transformers ViT /
DeiT / DINOv2, exactly) and ``hf_source`` (``create_model("hf:...")``), ``hub`` (the one model
format, ``save_pretrained`` / ``load_pretrained``: the ``create_model`` call, the data config and
safetensors; also what ``create_model(name, pretrained_file=...)`` reads), ``checkpoint``
(training checkpoints, read with ``weights_only=True``) and ``stored_config`` (a stored model
config checked as data). Imports ``visattn.models``, ``visattn.layers`` and the leaves.
"""

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .hf import from_transformers
from .hf_source import hf_model
from .hub import load_pretrained, save_pretrained
from .peer_names import pretrained_model
from .timm_vit import from_timm
from .torchvision_vit import from_torchvision

__all__ = [
    "CheckpointError",
    "from_timm",
    "from_torchvision",
    "from_transformers",
    "hf_model",
    "load_checkpoint",
    "load_pretrained",
    "model_from_checkpoint",
    "pretrained_model",
    "save_checkpoint",
    "save_pretrained",
]
