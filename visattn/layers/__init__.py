"""Layer 1: the attention arithmetic and the modules built on it.

``functional`` (the one ``softmax(q kᵀ) v``), ``pos_embed`` (positions), ``patch_embed``,
``attention`` (``MultiHeadAttention``, ``SelfAttention2d``, the recording switch) and ``blocks``
(``EncoderBlock``). Imports only the leaves ``visattn._io`` / ``visattn._utils``.
"""

from . import functional
from .attention import (
    AttentionRecord,
    MultiHeadAttention,
    RecordableAttention,
    RecordingRequest,
    SelfAttention2d,
)
from .blocks import EncoderBlock
from .patch_embed import PatchEmbed
from .pos_embed import resample_pos_embed, sincos_2d

__all__ = [
    "AttentionRecord",
    "EncoderBlock",
    "MultiHeadAttention",
    "PatchEmbed",
    "RecordableAttention",
    "RecordingRequest",
    "SelfAttention2d",
    "functional",
    "resample_pos_embed",
    "sincos_2d",
]
