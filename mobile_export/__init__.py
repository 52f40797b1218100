"""mobile-export: small language models to verified mobile bundles."""

__version__ = "0.1.0"
