"""Training data: the embedded default corpus and token streams read from
text files or llama2.c pretokenized shards (uint16 .bin)."""
from .corpus import default_corpus
from .loader import TokenData, load_data

__all__ = ["default_corpus", "TokenData", "load_data"]
