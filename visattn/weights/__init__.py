"""Layer 3: weights in and out.

``convert`` (timm and torchvision ViTs, exactly; registers their names with ``create_model``),
``hf`` (Hugging Face transformers ViT / DeiT / DINOv2, exactly) and ``hf_source`` (``create_model("hf:...")``),
``hub`` (the one model format, ``save_pretrained`` / ``load_pretrained``: the ``create_model`` call,
the data config and safetensors; also what ``create_model(name, pretrained_file=...)`` reads),
``checkpoint`` (training checkpoints, read with ``weights_only=True``) and ``stored_config`` (a
stored model config checked as data). Imports ``visattn.models``, ``visattn.layers``
and the leaves.
"""

from . import hf_source  # noqa: F401  registers the "hf:" source of create_model
