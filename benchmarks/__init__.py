"""Benchmarks whose printed figures the README and issue notes quote (not tests)."""
