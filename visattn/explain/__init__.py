"""Layer 4: where the model looks.

``recording`` (``record_attention``: exact, opt-in capture), ``maps`` (class-token attention,
rollout, gradient rollout, query maps, attention received), ``inputs`` (what the model is shown:
preprocessing, data configs), ``render`` (maps drawn on the original picture: ``overlay``,
``overlay_grid``), ``overlay`` (one picture's attention maps drawn: ``attention_overlay``),
``explore`` (the attention explorer: one self-contained HTML page), ``metrics`` (pointing game,
deletion/insertion, randomization test) and ``evaluate`` (all of them with baselines, intervals,
a table and a figure). Imports the layers below; never ``visattn.train``.
"""
