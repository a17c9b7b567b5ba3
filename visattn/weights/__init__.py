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

from . import hf_source, peer_names  # noqa: F401  register the "hf:" source and the timm/torchvision names of create_model
