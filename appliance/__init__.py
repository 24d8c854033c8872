"""Ferryman engine: replication, conversion, plans. Never imports Textual or tui."""

__version__ = "0.1.0"
