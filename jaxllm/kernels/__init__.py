"""Compiled kernels that XLA calls as custom calls (CPU only, opt-in by config)."""
