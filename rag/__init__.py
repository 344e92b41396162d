"""ragline rag package."""
