"""visattn: vision self-attention modules and Vision Transformers around one attention core."""

from . import functional
from .attention import AttentionRecord, MultiHeadAttention, SelfAttention2d
from .blocks import EncoderBlock
from .cnn import resnet18_small
from .hybrid import HybridEmbed, HybridViT
from .insert import AttentionSite, attention_sites, format_sites, insert_attention
from .pos_embed import resample_pos_embed, sincos_2d
from .registry import create_model, list_models, register_model, register_source
from .vit import PatchEmbed, VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord",
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
    "format_sites",
    "functional",
    "insert_attention",
    "list_models",
    "register_model",
    "register_source",
    "resnet18_small",
    "resample_pos_embed",
    "sincos_2d",
]
