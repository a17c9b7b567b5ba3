"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data`` (datasets),
``engine`` (``fit``: the loop behind ``train.py``) and ``lock`` (one training process per run
folder). Imports the layers below; never ``visattn.explain``.
"""
