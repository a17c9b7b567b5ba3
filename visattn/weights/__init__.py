"""Layer 3: weights in and out.

``convert`` (timm and torchvision ViTs, exactly; registers their names with ``create_model``),
``hub`` (``save_pretrained`` / ``load_pretrained``: safetensors + JSON) and ``checkpoint``
(training checkpoints, read with ``weights_only=True``). Imports ``visattn.models``, ``visattn.layers``
and the leaves.
"""

from .checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from .convert import from_timm, from_torchvision
from .hub import load_pretrained, save_pretrained

__all__ = [
    "CheckpointError",
    "from_timm",
    "from_torchvision",
    "load_checkpoint",
    "load_pretrained",
    "model_from_checkpoint",
    "save_checkpoint",
    "save_pretrained",
]
