"""vitrain: train timm Vision Transformers with Lightning + Hydra, and measure how fast."""

__version__ = "0.1.0"
