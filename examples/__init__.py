"""Runnable examples: a Transformer language model (``examples.lm``) and translation model (``examples.nmt``)."""
