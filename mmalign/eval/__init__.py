"""Evaluation: zero-shot classification, cross-modal retrieval, embedding shard sets."""
from .retrieval import bidirectional_retrieval, retrieval_metrics
from .zeroshot import zeroshot_accuracy, zeroshot_classifier

__all__ = ["retrieval_metrics", "bidirectional_retrieval", "zeroshot_classifier", "zeroshot_accuracy"]
