"""ragline benchmarks package."""
