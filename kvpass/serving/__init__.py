"""Serving engines that run kvpass's step with the evicting tables as their per-request state."""
