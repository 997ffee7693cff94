"""Surogate: a declarative compiler and runtime for training causal language models."""

__version__ = "0.1.0"
