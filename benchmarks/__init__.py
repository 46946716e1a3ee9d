"""Benchmarks of fastattn_icl's ops against the eager reference and PyTorch SDPA (see README.md)."""
