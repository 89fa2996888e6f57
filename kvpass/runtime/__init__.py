"""What a transformed model runs: the rewritten attention site, the one step over the evicting
cache tables, the cache itself, per-layer budgets, generation, compilation, and the one module that
knows transformers' internals (``hf``)."""
