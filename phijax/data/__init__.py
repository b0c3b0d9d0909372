"""Data: corpus readers, tokenizers (sentencepiece and Hugging Face tokenizer.json), token stores, mixtures and the Grain loader."""
