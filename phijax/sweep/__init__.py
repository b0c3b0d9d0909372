"""Config sweeps: a grid of training runs whose cells are hashed by what they compute (spec.py,
identity.py), each in its own directory with status, lock and heartbeat (cells.py), run by any
number of identical workers claiming cells (runner.py), and reported as a table and a plot
(report.py); `phijax sweep plan|run|work|status|render` (command.py)."""
