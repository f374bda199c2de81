"""reskd: train ResKD cascades and serve them with sample-adaptive early exit."""

__version__ = "0.1.0"
