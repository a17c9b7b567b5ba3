"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data`` (datasets),
``imagefolder`` (folders that cannot lie: each picture once, under one class; unreadable ones
counted and named) and ``engine`` (``fit``: the loop behind ``train.py``). Imports the layers
below; never ``visattn.explain``.
"""
