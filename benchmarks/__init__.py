"""visattn's benchmark suite: ``python -m benchmarks`` (or ``visattn bench``); see ``--help``.

Each part is one module with ``NAME``, ``TITLE`` and ``run(config) -> Part``, listed in
:data:`benchmarks.__main__.PARTS`; adding a part is adding a module and one line there.
"""
