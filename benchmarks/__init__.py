"""Benchmarks: cnnray against plain references, side by side in one run."""
