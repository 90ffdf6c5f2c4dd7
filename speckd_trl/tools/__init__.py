"""Tiny offline models, tokenizers and data for tests, examples and benchmarks (`testing`). The library does not
import them.
"""
