"""The pre-training data-mixture experiment."""
