"""Layer 4: where the model looks.

``recording`` (``record_attention``: exact, opt-in capture), ``maps`` (class-token attention,
rollout, gradient rollout, query maps, attention received), ``overlay`` (maps on the
original picture), ``explore`` (the attention explorer: one self-contained HTML page),
``metrics`` (pointing game, deletion/insertion, randomization test) and ``evaluate`` (all of
them with baselines, intervals, a table and a figure). Imports the layers below; never
``visattn.train``.
"""
