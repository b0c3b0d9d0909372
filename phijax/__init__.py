"""phijax: a JAX-first reproduction of the Phi-4 training recipe."""
__version__ = "0.1.0"
