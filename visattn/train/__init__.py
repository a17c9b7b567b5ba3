"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data`` (datasets),
``imagefolder`` (folders of pictures that cannot lie: each picture counted once, under one class)
and ``engine`` (``fit``: the loop behind ``train.py``). Imports the layers below; never
``visattn.explain``.
"""
