"""wake2vec: teach a pretrained Llama new words by training only its embedding table."""

__version__ = "0.1.0"
