"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data`` (datasets)
and ``engine`` (``fit``: the loop behind ``train.py``). Imports the layers below; never
``visattn.explain``.
"""
