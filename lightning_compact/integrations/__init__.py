"""Adapters for training loops and layer types outside Lightning; each imports its library lazily.

The core (:mod:`lightning_compact`) never imports this package.
"""
