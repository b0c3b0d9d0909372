"""Reproductions of the Phi-4 report's claims, one folder each, run by `phijax-experiment`."""
