"""`phijax plan`: prove on a CPU host that a training config fits a TPU slice, and what it costs.

chips.py (the chip table, topology names), compile.py (the train step traced and compiled for
a topology's devices; matmul FLOPs from its jaxpr), hlo.py (collectives and loop trips from the
compiled HLO), report.py (plan.json fields, the roofline, the table), build.py (one plan),
search.py (`--search`), command.py (the CLI command).
"""
