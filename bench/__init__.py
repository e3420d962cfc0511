"""Benchmark harness of the weighted LM-head loss: mrloss against the losses a user would otherwise use.

Entry point: ``python -m bench.linear_ce`` (see bench/README.md). Modules:
cases (shapes, presets, inputs), baselines (the implementations compared), measure (one implementation
on one case, in its own process), report (JSON / CSV / Markdown / PNG), linear_ce (the command).
"""
