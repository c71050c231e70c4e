"""Offline tokenization, memory-mapped shards, pair datasets, packing and sampling."""
