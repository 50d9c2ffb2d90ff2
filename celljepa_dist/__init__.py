"""celljepa-dist: distributed pre-training of Cell-JEPA single-cell foundation models."""

__version__ = "0.1.0"
