"""Layer 4: where the model looks.

``recording`` (``record_attention``: exact, opt-in capture), ``maps`` (class-token attention,
rollout, gradient rollout, query maps, attention received), ``overlay`` (maps on the
original picture) and ``explore`` (the attention explorer: one self-contained HTML page).
Imports the layers below; never ``visattn.train``.
"""

from . import maps
from .overlay import overlay, overlay_grid
from .recording import AttentionRecording, record_attention

__all__ = ["AttentionRecording", "maps", "overlay", "overlay_grid", "record_attention"]
