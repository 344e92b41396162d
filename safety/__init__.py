"""ragline safety package."""
