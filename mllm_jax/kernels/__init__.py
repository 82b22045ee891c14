"""Hand-written kernels XLA does not generate well, each with an XLA fallback (see cpu.py)."""
