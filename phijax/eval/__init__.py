"""Evaluation: answer extraction, question oracles, accuracy with its standard error."""
