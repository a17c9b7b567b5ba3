"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data`` (datasets),
``budget`` (model arguments and the training memory a config needs, checked before anything is
built) and ``engine`` (``fit``: the loop behind ``train.py``). Imports the layers below; never
``visattn.explain``.
"""
