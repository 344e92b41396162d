"""ragline finetune package."""
