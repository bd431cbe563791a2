"""Timing harnesses, not ops: kernel benchmarks (:mod:`qtool.bench.kernels`) and the end-to-end
decode benchmark (:mod:`qtool.bench.generate`). The CLI reaches them through :mod:`qtool.api`
(``qtool bench ...``); ``python -m scripts.bench.bench_kernels`` writes their tables.

Layer: above ``recipe`` and below ``api``; they may import models, algorithms, ops and recipe.
"""
