"""The evaluation stage: zero-shot classification and image<->text retrieval."""
