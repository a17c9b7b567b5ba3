"""Layer 1: the attention arithmetic and the modules built on it.

``functional`` (the one ``softmax(q kᵀ) v``), ``pos_embed`` (positions), ``patch_embed``,
``attention`` (``MultiHeadAttention``, ``SelfAttention2d``, the recording switch), ``local``
(``WindowAttention2d``, ``NeighborhoodAttention2d``, ``HaloAttention2d``) on the tiled kernel of
``local_kernel``, and ``blocks`` (``EncoderBlock``). Imports only the leaves ``visattn._io`` /
``visattn._utils``.
"""
