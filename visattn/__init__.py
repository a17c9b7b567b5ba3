"""visattn: vision self-attention modules and Vision Transformers around one attention core.

The package is layered (imports only go down): the leaves ``_io``, ``_utils`` and ``data_spec``;
``layers`` (the attention arithmetic and modules); ``models`` (named models, CNN insertion);
``weights`` (conversion, save/load, checkpoints); ``explain`` and ``train``; and ``cli`` on top.
"""

from ._io import CheckpointError, load_image
from .data_spec import DataSpec
from .explain.explore import explore
from .explain.recording import AttentionRecording, record_attention
from .explain.render import overlay, overlay_grid
from .layers.attention import AttentionRecord, MultiHeadAttention, SelfAttention2d
from .layers.blocks import EncoderBlock
from .layers.local import HaloAttention2d, NeighborhoodAttention2d, WindowAttention2d
from .layers.patch_embed import PatchEmbed
from .layers.pos_embed import resample_pos_embed, sincos_2d
from .models.cnn import resnet18_small
from .models.hybrid import HybridEmbed, HybridViT
from .models.insert import AttentionSite, attention_sites, format_sites, insert_attention
from .models.registry import create_model, list_models, register_model, register_source
from .models.vit import VisionTransformer
from .weights.hf import from_transformers
from .weights.hub import load_pretrained, save_pretrained
from .weights.timm_vit import from_timm
from .weights.torchvision_vit import from_torchvision

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord",
    "AttentionRecording",
    "AttentionSite",
    "CheckpointError",
    "DataSpec",
    "EncoderBlock",
    "HaloAttention2d",
    "HybridEmbed",
    "HybridViT",
    "MultiHeadAttention",
    "NeighborhoodAttention2d",
    "PatchEmbed",
    "SelfAttention2d",
    "VisionTransformer",
    "WindowAttention2d",
    "attention_sites",
    "create_model",
    "explore",
    "format_sites",
    "from_timm",
    "from_torchvision",
    "from_transformers",
    "insert_attention",
    "list_models",
    "load_image",
    "load_pretrained",
    "overlay",
    "overlay_grid",
    "record_attention",
    "register_model",
    "register_source",
    "resample_pos_embed",
    "resnet18_small",
    "save_pretrained",
    "sincos_2d",
]
