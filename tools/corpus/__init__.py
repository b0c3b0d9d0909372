"""Organic data: extraction, language identification, heuristic filters, deduplication, run over phijax.data.readers."""
