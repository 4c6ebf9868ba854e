"""Serving engines: many requests sampled together, each as if it ran alone."""

from musicgen.engine.cache import SlotCache
from musicgen.engine.dr2 import BlockCallback, DR2Engine, SongHandle, cache_bytes_alone

__all__ = ["BlockCallback", "DR2Engine", "SlotCache", "SongHandle", "cache_bytes_alone"]
