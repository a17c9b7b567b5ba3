"""visattn: vision self-attention modules and Vision Transformers around one attention core."""

from . import functional, maps
from .attention import AttentionRecord, MultiHeadAttention, SelfAttention2d
from .blocks import EncoderBlock
from .maps import AttentionRecording, record_attention
from .overlay import overlay, overlay_grid
from .pos_embed import resample_pos_embed, sincos_2d
from .registry import create_model, list_models, register_model, register_source
from .vit import PatchEmbed, VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord",
    "AttentionRecording",
    "EncoderBlock",
    "MultiHeadAttention",
    "PatchEmbed",
    "SelfAttention2d",
    "VisionTransformer",
    "create_model",
    "functional",
    "list_models",
    "maps",
    "overlay",
    "overlay_grid",
    "record_attention",
    "register_model",
    "register_source",
    "resample_pos_embed",
    "sincos_2d",
]
