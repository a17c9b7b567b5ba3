"""Layer 4: training.

``config`` (typed OmegaConf schema), ``augment`` (batched augmentation), ``data``
(``build_datasets``: the config's ``data`` section to datasets; ``held_out_pictures``),
``tensor_dataset`` (images held in memory, augmented a batch at a time), ``digits``
(scikit-learn's digits and the digit canvas), ``cifar`` (CIFAR batches read without running
code), ``imagefolder`` (folders that cannot lie: each picture once, under one class; unreadable
ones counted and named), ``budget`` (model arguments and the training memory a config needs,
checked before anything is built), ``engine`` (``fit``: the loop behind ``train.py``, one epoch,
evaluation), and what the loop uses: ``distributed`` (processes, their loaders, reductions),
``run_folder`` (claim, release, metrics file, curves), ``lock`` (one training process per run
folder), ``resume`` (saved config, allowed overrides), ``precision`` (the rule of
``train.amp=auto``), ``recipe`` (optimizer, schedule, loss, EMA) and ``checkpoints``
(``last.pt``, ``best.pt``). Imports the layers below; never ``visattn.explain`` (the front end
adds the explorer page).
"""
