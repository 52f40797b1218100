"""Runtimes that load a bundle's artifact and step it: prefill, decode, logits."""
