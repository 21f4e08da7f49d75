"""Decoder families, their registry and the loaders that fill them from HF folders, the Hub and GGUF files."""
