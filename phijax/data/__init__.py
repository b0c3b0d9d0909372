"""Data: corpus readers, the sentencepiece tokenizer, token stores and the Grain loader."""
