"""ragline gateway package."""
