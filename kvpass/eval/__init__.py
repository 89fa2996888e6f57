"""Measuring: the long-context evaluation, the benchmarks, the architecture sweep, layer
sensitivity for per-layer budgets, reports, and the peer (kvpress) run on the same cases."""
