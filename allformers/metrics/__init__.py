"""Text metrics shared by recipes and benchmarks."""
from .rouge import lcs_length, max_rouge_l, rouge_l, rouge_l_corpus, rouge_tokens
from .source_classifier import CharNGramClassifier

__all__ = ["rouge_l", "max_rouge_l", "rouge_l_corpus", "rouge_tokens", "lcs_length", "CharNGramClassifier"]
