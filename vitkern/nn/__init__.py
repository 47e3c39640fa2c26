"""Drop-in modules built on vitkern's attention functions."""
from .attention import Attention, attention

__all__ = ["Attention", "attention"]
