"""Evaluation outputs, and runs compared side by side.

An evaluation directory holds `results.json` ({"checkpoint", "step", "config", "tasks": {task:
{metric: {value, stderr, n}}}}) and `items/<task>.jsonl`, one record per item (prompt, answers,
extracted answers, reference, score), so every figure can be traced to its items.

`compare` puts several evaluation directories side by side: each metric's value ± standard
error per run, and each run's difference from the first with its standard error, paired over
the items both runs scored where the per-item scores allow it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from phijax import paths
from phijax.errors import ConfigError
from phijax.files import jsonl_line, read_jsonl, save_figure

# The per-item field behind each metric (for paired differences).
ITEM_SCORE = {"accuracy": "score", "acc": "score", "acc_norm": "score_norm",
              "acc_gen": "score_gen", "pass@1": "score"}


def write_results(out: str | Path, results: dict, header: dict) -> Path:
    """`out` may be a gs:// or s3:// URL: each file is written whole."""
    out = paths.as_path(out)
    for task, (_, records) in results.items():
        paths.write_text(out / "items" / f"{task}.jsonl", "".join(map(jsonl_line, records)))
    doc = {**header, "tasks": {task: metrics for task, (metrics, _) in results.items()}}
    paths.write_text(out / "results.json", json.dumps(doc, indent=1) + "\n")
    return out


def load_results(out: str | Path) -> dict:
    path = paths.as_path(out) / "results.json"
    if not paths.exists(path):
        raise ConfigError(f"{out}: no results.json (give a directory `phijax eval --out` wrote)")
    return json.loads(paths.read_text(path))


def format_results(doc: dict) -> str:
    lines = [f"{'task':<10} {'metric':<14} {'value':>8} {'± stderr':>9} {'n':>6}"]
    for task, metrics in doc["tasks"].items():
        for name, m in metrics.items():
            lines.append(f"{task:<10} {name:<14} {m['value']:>8.4f} {m['stderr']:>9.4f} "
                         f"{m['n']:>6}")
    return "\n".join(lines)


def _item_scores(out: Path, task: str, field: str) -> dict:
    path = out / "items" / f"{task}.jsonl"
    if not paths.exists(path):
        return {}
    return {r["id"]: r[field] for _, r in read_jsonl(path) if field in r}


def difference(base: Path, other: Path, task: str, name: str, a: dict, b: dict):
    """(other - base, its standard error): paired over shared items when possible."""
    field = ITEM_SCORE.get(name)
    if field:
        x, y = _item_scores(base, task, field), _item_scores(other, task, field)
        shared = sorted(set(x) & set(y))
        if shared and len(shared) == a["n"] == b["n"]:
            d = [y[i] - x[i] for i in shared]
            mean = sum(d) / len(d)
            var = sum((v - mean) ** 2 for v in d) / len(d)
            return mean, math.sqrt(var / len(d))
    return b["value"] - a["value"], math.hypot(a["stderr"], b["stderr"])


def compare(outs: list[str | Path]) -> tuple[str, list[dict]]:
    """The side-by-side table (text) and its rows ({task, metric, runs: [(value, stderr)],
    diffs: [(diff, stderr)]})."""
    if len(outs) < 2:
        raise ConfigError("compare: give at least two evaluation directories")
    outs = [paths.as_path(o) for o in outs]
    docs = [load_results(o) for o in outs]
    rows = []
    for task, metrics in docs[0]["tasks"].items():
        for name, first in metrics.items():
            got = [d["tasks"].get(task, {}).get(name) for d in docs]
            if any(g is None for g in got):
                continue
            diffs = [difference(outs[0], o, task, name, first, g)
                     for o, g in zip(outs[1:], got[1:])]
            rows.append({"task": task, "metric": name,
                         "runs": [(g["value"], g["stderr"]) for g in got], "diffs": diffs})
    head = f"{'task':<10} {'metric':<10} " + " ".join(f"{'run ' + str(i):>17}"
                                                      for i in range(len(outs)))
    head += " " + " ".join(f"{'run ' + str(i) + ' - run 0':>19}" for i in range(1, len(outs)))
    lines = [head] + [f"{r['task']:<10} {r['metric']:<10} "
                      + " ".join(f"{v:>8.4f} ± {s:<6.4f}" for v, s in r["runs"]) + " "
                      + " ".join(f"{d:>+10.4f} ± {s:<6.4f}" for d, s in r["diffs"])
                      for r in rows]
    lines += [f"run {i}: {o} (step {d.get('step')})" for i, (o, d) in enumerate(zip(outs, docs))]
    return "\n".join(lines), rows


def plot(rows: list[dict], labels: list[str], path: str | Path) -> Path:
    """A grouped bar chart of every metric, one bar per run, with standard-error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [f"{r['task']}\n{r['metric']}" for r in rows]
    x, width = np.arange(len(rows)), 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * len(labels)), 4))
    for i, label in enumerate(labels):
        values = [r["runs"][i][0] for r in rows]
        errors = [r["runs"][i][1] for r in rows]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, yerr=errors, capsize=3,
               label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
