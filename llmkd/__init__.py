"""llmkd: distil a pretrained language model into a small, fast two-tower recommender."""

__version__ = "0.1.0"
