"""Layer 2: named models and what builds them.

``registry`` (a leaf that the others register into), ``vit`` (``VisionTransformer``),
``hybrid`` (CNN stem + Transformer), ``cnn`` (torchvision/timm CNN sources) and ``insert``
(``insert_attention`` into any CNN). Imports ``visattn.layers`` and the leaves.
"""
