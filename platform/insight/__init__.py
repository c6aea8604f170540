"""Insight: a language-aligned concept model for vision, on Ray."""

__version__ = "0.1.0"
