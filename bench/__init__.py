"""Benchmarks (``make bench``): every number is printed next to a real peer measured in the same run."""
