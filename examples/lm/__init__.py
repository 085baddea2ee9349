"""Causal language model example: GPT-2-style decoder (from a config, or a pretrained causal LM fine-tuned)."""
