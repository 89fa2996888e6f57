"""Training Attention-Gates on a frozen model (``kvpass train``)."""
