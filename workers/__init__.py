"""The processing side: arq job functions, one per event kind, and the outputs they write."""

from workers.registry import on

__all__ = ["on"]
