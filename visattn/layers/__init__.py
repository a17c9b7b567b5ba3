"""Layer 1: the attention arithmetic and the modules built on it.

``functional`` (the one ``softmax(q kᵀ) v``), ``pos_embed`` (positions), ``patch_embed``,
``attention`` (``MultiHeadAttention``, ``SelfAttention2d``, the recording switch) and ``blocks``
(``EncoderBlock``). Imports only the leaves ``visattn._io`` / ``visattn._utils``.
"""
