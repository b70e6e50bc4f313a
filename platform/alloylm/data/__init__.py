"""Data preparation: reading sources, cleaning, deduplication, tokenization and packing on Ray Data."""
