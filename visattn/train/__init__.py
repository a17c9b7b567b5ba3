"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data``
(``build_datasets``: the config's ``data`` section to datasets), ``tensor_dataset`` (images held
in memory, augmented a batch at a time), ``digits`` (scikit-learn's digits and the digit canvas),
``cifar`` (CIFAR batches read without running code), ``imagefolder`` (folders that cannot lie:
each picture once, under one class; unreadable ones counted and named), ``engine`` (``fit``: the
loop behind ``train.py``) and ``lock`` (one training process per run folder). Imports the layers
below; never ``visattn.explain``.
"""
