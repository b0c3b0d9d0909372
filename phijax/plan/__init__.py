"""`phijax plan`: prove on a CPU host that a config's step (training, SFT, DPO or decoding) fits
a TPU slice, and what it costs.

chips.py (the chip table, topology names), programs.py (the steps, built as their commands
build them, traced with abstract arguments), compile.py (the mesh, compiling for a topology's
devices; matmul FLOPs from a jaxpr), hlo.py (collectives, kernels and loop trips from the
compiled HLO), report.py (plan.json fields, the roofline, the table), build.py (one plan),
search.py (`--search`), command.py (the CLI command).
"""
