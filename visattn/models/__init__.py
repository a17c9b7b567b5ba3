"""Layer 2: named models and what builds them.

``registry`` (a leaf that the others register into), ``vit`` (``VisionTransformer``),
``hybrid`` (CNN stem + Transformer), ``cnn`` (torchvision/timm CNN sources) and ``insert``
(``insert_attention`` into any CNN). Imports ``visattn.layers`` and the leaves.
"""

from .cnn import resnet18_small
from .hybrid import HybridEmbed, HybridViT
from .insert import AttentionSite, attention_sites, format_sites, insert_attention
from .registry import create_model, list_models, register_model, register_source
from .vit import VisionTransformer

__all__ = [
    "AttentionSite",
    "HybridEmbed",
    "HybridViT",
    "VisionTransformer",
    "attention_sites",
    "create_model",
    "format_sites",
    "insert_attention",
    "list_models",
    "register_model",
    "register_source",
    "resnet18_small",
]
