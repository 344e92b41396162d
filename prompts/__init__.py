"""ragline prompts package."""
