"""visattn: vision self-attention modules and Vision Transformers around one attention core."""

from . import functional, maps
from .attention import AttentionRecord, MultiHeadAttention, SelfAttention2d
from .blocks import EncoderBlock
from .cnn import resnet18_small
from .convert import from_timm, from_torchvision
from .hub import load_pretrained, save_pretrained
from .hybrid import HybridEmbed, HybridViT
from .insert import AttentionSite, attention_sites, format_sites, insert_attention
from .maps import AttentionRecording, record_attention
from .overlay import overlay, overlay_grid
from .pos_embed import resample_pos_embed, sincos_2d
from .registry import create_model, list_models, register_model, register_source
from .vit import PatchEmbed, VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord",
    "AttentionRecording",
    "AttentionSite",
    "EncoderBlock",
    "HybridEmbed",
    "HybridViT",
    "MultiHeadAttention",
    "PatchEmbed",
    "SelfAttention2d",
    "VisionTransformer",
    "attention_sites",
    "create_model",
    "from_timm",
    "from_torchvision",
    "format_sites",
    "functional",
    "insert_attention",
    "list_models",
    "maps",
    "overlay",
    "overlay_grid",
    "record_attention",
    "load_pretrained",
    "register_model",
    "register_source",
    "resnet18_small",
    "resample_pos_embed",
    "save_pretrained",
    "sincos_2d",
]
