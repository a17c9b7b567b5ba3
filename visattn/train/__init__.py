"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data`` (datasets),
``imagefolder`` (folders that cannot lie: each picture once, under one class; unreadable ones
counted and named), ``budget`` (model arguments and the training memory a config needs, checked
before anything is built), ``engine`` (``fit``: the loop behind ``train.py``) and ``lock`` (one
training process per run folder). Imports the layers below; never ``visattn.explain``.
"""
