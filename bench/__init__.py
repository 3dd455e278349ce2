"""Benchmarks: load generator, in-process engine bench, peers and the comparison run."""
