"""AlloyLM: domain adaptation of language models on Ray (arXiv:2409.03444 as one distributed run)."""

__version__ = "0.1.0"
