"""What `phijax sweep plan` and `status` print: cells with hashes and states, each cell's final
metrics read from its metrics.jsonl, and a PNG of the loss curves and a metric over a grid axis."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from phijax.files import save_figure
from phijax import paths
from phijax.sweep.cells import CellDir
from phijax.sweep.spec import Cell, SweepSpec


def cell_state(cell: Cell, stale_after: float) -> dict:
    """status.json, with `state` told apart further by the cell's lock: running (a live lock)
    or stale (running under a lock whose heartbeat expired)."""
    d = CellDir(cell.dir)
    status = d.status()
    lock = d.lock_state(stale_after)
    if lock == "live" and status["state"] != "success":
        status["state"] = "running"
    elif lock == "stale" and status["state"] == "running":
        status["state"] = "stale"
    return status


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
             for r in [header] + rows]
    return "\n".join(lines)


def format_plan(spec: SweepSpec, cells: list[Cell], stale_after: float) -> str:
    rows = []
    for cell in cells:
        s = cell_state(cell, stale_after)
        rows.append([cell.label, cell.hash, s["state"], str(s["attempts"]), str(cell.dir)])
    counts = {}
    for row in rows:
        counts[row[2]] = counts.get(row[2], 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    return (f"sweep {spec.name}: {len(cells)} cells of {spec.base} ({summary})\n" +
            _table(["cell", "hash", "state", "attempts", "directory"], rows))


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl, local or in a bucket (a torn last line, while it
    runs, left out)."""
    try:
        text = paths.read_text(paths.as_path(run_dir) / "metrics.jsonl")
    except (FileNotFoundError, IsADirectoryError):
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def final_metrics(records: list[dict]) -> dict:
    """Each metric's last logged value, and the last step."""
    out: dict = {}
    for record in records:
        out.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return out


def metric_names(spec: SweepSpec, finals: list[dict], chosen: Optional[list[str]]) -> list[str]:
    """`chosen`, else the sweep's metrics and every benchmark score (eval/TASK/METRIC) logged."""
    if chosen:
        return chosen
    tasks = sorted({k for f in finals for k in f
                    if k.startswith("eval/") and not k.endswith("_stderr")})
    return list(spec.metrics) + [t for t in tasks if t not in spec.metrics]


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def format_status(spec: SweepSpec, cells: list[Cell], stale_after: float,
                  metrics: Optional[list[str]] = None) -> str:
    finals = [final_metrics(read_metrics(c.dir)) for c in cells]
    names = metric_names(spec, finals, metrics)
    rows = []
    for cell, final in zip(cells, finals):
        s = cell_state(cell, stale_after)
        error = f"  {s['last_error']}" if s["state"] == "failed" and s["last_error"] else ""
        rows.append([cell.label, s["state"], str(s["attempts"]), _num(final.get("step"))] +
                    [_num(final.get(n)) for n in names] + [error.strip()])
    return _table(["cell", "state", "attempts", "step"] + names + [""], rows)


def _axis_value(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def plot(spec: SweepSpec, cells: list[Cell], path: str | Path, axis: Optional[str] = None,
         metric: Optional[str] = None) -> Path:
    """Loss curves of every cell, and `metric` (default eval_loss when logged, else loss) at
    the end of each cell over grid key `axis` (default the first), one line per setting of the
    other keys."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_metrics(c.dir) for c in cells]
    finals = [final_metrics(r) for r in runs]
    metric = metric or ("eval_loss" if any("eval_loss" in f for f in finals) else "loss")
    axis = axis or next(iter(cells[0].values), None)
    fig, (curves, over) = plt.subplots(1, 2, figsize=(13, 4.8))
    for cell, records in zip(cells, runs):
        points = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
        if points:
            curves.plot(*zip(*points), label=cell.label, linewidth=1)
    curves.set(xlabel="step", ylabel="train loss", title=f"sweep {spec.name}")
    if any(runs):
        curves.legend(fontsize=7)
    groups: dict[str, list] = {}
    for cell, final in zip(cells, finals):
        if axis in cell.values and metric in final:
            rest = ",".join(f"{k.split('.')[-1]}={v}" for k, v in cell.values.items() if k != axis)
            groups.setdefault(rest or metric, []).append((cell.values[axis], final[metric]))
    xs = [x for points in groups.values() for x, _ in points]
    numeric = xs and all(_axis_value(x) is not None for x in xs)
    for name, points in groups.items():
        if numeric:
            points = sorted(points, key=lambda p: _axis_value(p[0]))
            over.plot([_axis_value(x) for x, _ in points], [y for _, y in points], "o-",
                      label=name)
        else:
            order = list(dict.fromkeys(str(x) for x in xs))
            over.plot([order.index(str(x)) for x, _ in points], [y for _, y in points], "o-",
                      label=name)
            over.set_xticks(range(len(order)), order)
    if numeric and min(map(_axis_value, xs)) > 0 and \
            max(map(_axis_value, xs)) >= 10 * min(map(_axis_value, xs)):
        over.set_xscale("log")
    over.set(xlabel=axis or "(no grid)", ylabel=f"final {metric}")
    if groups:
        over.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
