"""Pieces shared by the LM and NMT examples: data paths, BPE tokenizers, the CLI entry point."""
