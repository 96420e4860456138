"""Finetuning and evaluation tasks (GLM_SPEC section 6)."""
