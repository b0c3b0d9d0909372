"""The pre-training data-mixture experiment: does synthetic-heavy data win on reasoning and lose
on knowledge, and do web rewrites recover part of the knowledge?

    phijax-experiment mixture [--out DIR] [--seeds N] [--steps N] [--shares [--share-seeds N]]
                              [--set KEY=VALUE]

One command runs every stage, each skipped when its output exists (rerun to resume):

  1. world     a toy world (experiments.mixture.world): web, code and reference documents,
               held-out knowledge (SimpleQA-style) and reasoning (question JSONL) sets, each
               held-out item sharing n-grams with the training text dropped (tools.decontam)
                                                                            -> OUT/data/
  2. teacher   the scripted teacher on loopback; configs/pipelines/mixture-synthetic.yaml
               (rewrite -> difficulty -> decontaminate, then answer verification) and
               mixture-rewrites.yaml (restate -> self_revise -> decontaminate) -> OUT/pipelines/
  3. stores    a tokenizer trained on the training text; a token store per source
                                                                            -> OUT/stores/
  4. sweep     configs/sweeps/mixture-arms.yaml (and with --shares mixture-shares.yaml) with
               OUT's mixture, steps and seeds, copied to OUT/<name>.yaml and run by phijax.sweep
               after checking that no arm repeats a source more than max_epochs times
  5. eval      `phijax eval` (run_eval) of every cell on both held-out sets -> OUT/eval/<cell>/
  6. table     accuracy ± stderr per arm (items pooled over seeds) -> OUT/results.{json,md,png}
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from phijax.errors import ConfigError, DataError
from phijax.files import atomic_write, read_jsonl, save_figure, write_jsonl

log = logging.getLogger("phijax")
ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("web", "web-rewrites", "synthetic", "code", "acquired")
ARM_NAMES = {("web",): "web only", ("synthetic",): "synthetic only",
             ("synthetic", "web-rewrites"): "synthetic + web rewrites",
             tuple(sorted(SOURCES)): "phi-4 mixture (Table 5)"}
# held-out set -> {phijax eval task: file}; each set is also asked as multiple choice
SETS = {"reasoning": {"arith": "reasoning.jsonl", "choice": "reasoning-choice.jsonl"},
        "knowledge": {"simpleqa": "knowledge.jsonl", "choice": "knowledge-choice.jsonl"}}
# the table's columns: (set, task) -> name
METRICS = {("reasoning", "arith"): "reasoning", ("reasoning", "choice"): "reasoning_choice",
           ("knowledge", "simpleqa"): "knowledge", ("knowledge", "choice"): "knowledge_choice"}
LABELS = {"reasoning": "reasoning (answer)", "reasoning_choice": "reasoning (choice)",
          "knowledge": "knowledge (answer)", "knowledge_choice": "knowledge (choice)"}


@dataclass
class MixtureExperiment:
    out: str = "runs/mixture"
    world_seed: int = 0
    people: int = 300
    towns: int = 20
    mentions: int = 3  # statements of each fact across the web documents
    code_docs: int = 1000
    acquired_docs: int = 1000
    knowledge: int = 200  # held-out questions before decontamination
    reasoning: int = 200
    error_rate: float = 0.1  # the teacher's
    vocab_size: int = 1024
    seeds: int = 3  # training seeds per arm
    share_seeds: int | None = None  # per point of the shares sweep (default: seeds)
    steps: int = 500  # x 4 x 512 = 1.02M tokens an arm (configs/sweeps/mixture-arms.yaml)
    overrides: list[str] = field(default_factory=list)  # training keys set in every cell
    sweeps: list[str] = field(default_factory=lambda: ["configs/sweeps/mixture-arms.yaml"])
    max_new_tokens: int = 96  # per reasoning answer (knowledge answers: at most 16)
    max_epochs: float = 20.0  # an arm repeating a source more often fails before training


# ---------------------------------------------------------------- 1. world

def make_data(cfg: MixtureExperiment, data: Path) -> dict:
    """The world's documents and decontaminated held-out sets under `data`; its summary."""
    from experiments.mixture import world as W
    from tools.decontam import Index

    w = W.make_world(cfg.world_seed, cfg.people, cfg.towns)
    training = {"web": W.web_documents(w, cfg.mentions), "code": W.code_documents(w, cfg.code_docs),
                "acquired": W.acquired_documents(cfg.acquired_docs, cfg.world_seed)}
    heldout = {"knowledge": W.knowledge_questions(w, cfg.knowledge),
               "reasoning": W.reasoning_questions(w, cfg.reasoning)}
    text = {"knowledge": "problem", "reasoning": "prompt"}
    index = Index.from_records((name, q["id"], q[text[name]])
                               for name, qs in heldout.items() for q in qs)
    texts = [d["text"] for docs in training.values() for d in docs]
    hit = {h.item_id for h in index.check_many(texts) if h is not None}
    summary = {"facts": len(w.facts), "contaminated_dropped": len(hit)}
    choices = {"knowledge": lambda qs: W.knowledge_choices(w, qs),
               "reasoning": lambda qs: W.reasoning_choices(qs, cfg.world_seed)}
    for name, qs in heldout.items():
        kept = [q for q in qs if q["id"] not in hit]
        if not kept:
            raise DataError(f"held-out {name}: every question overlaps the training text")
        write_jsonl(data / f"{name}.jsonl", kept)
        write_jsonl(data / f"{name}-choice.jsonl", choices[name](kept))
        summary[name] = len(kept)
    for name, docs in training.items():
        write_jsonl(data / f"{name}.jsonl", docs)
        summary[f"{name}_docs"] = len(docs)
    Index.from_records((name, q["id"], q[text[name]]) for name in heldout
                       for _, q in read_jsonl(data / f"{name}.jsonl")).save(data / "heldout.npz")
    atomic_write(data / "world.json", json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------- 2. teacher pipelines

def _pipeline(config: str, url: str, data: Path, out: Path) -> list[dict]:
    from tools.pipeline import load_pipeline, read_records, run_pipeline

    pipe = load_pipeline(ROOT / config, overrides=[
        f"teacher.base_url={url}", f"input={data / 'web.jsonl'}", f"output={out}",
        f"stages.2.index={data / 'heldout.npz'}", "teacher.backoff_base_s=0.01"])
    result = asyncio.run(run_pipeline(pipe, progress=False))
    stats = {s.name: dict(s.stats) for s in pipe.stages}
    atomic_write(out / "stats.json", json.dumps({"summary": result, "stages": stats}, indent=1))
    return read_records(out)


def make_generated(cfg: MixtureExperiment, data: Path, out: Path) -> dict:
    """Synthetic exercises and web rewrites from the scripted teacher -> data/*.jsonl."""
    from experiments.mixture.teacher import ScriptedTeacher, TeacherServer
    from experiments.mixture.world import make_world
    from phijax.eval.answers import normalize_answer

    docs = [d for _, d in read_jsonl(data / "web.jsonl")]
    teacher = ScriptedTeacher(make_world(cfg.world_seed, cfg.people, cfg.towns), docs,
                              cfg.error_rate)
    with TeacherServer(teacher) as srv:
        synthetic = _pipeline("configs/pipelines/mixture-synthetic.yaml", srv.url, data,
                              out / "synthetic")
        rewrites = _pipeline("configs/pipelines/mixture-rewrites.yaml", srv.url, data,
                             out / "rewrites")
    verified = [r for r in synthetic
                if normalize_answer(r["response"], "math") == r["reference_answer"]]
    write_jsonl(data / "synthetic.jsonl", [{"id": r["id"], "text": f"{r['instruction']}\n\n"
                                            f"{r['response']}"} for r in verified])
    write_jsonl(data / "web-rewrites.jsonl", [{"id": r["id"], "text": r["rewrite"]}
                                              for r in rewrites])
    return {"synthetic": len(verified), "synthetic_unverified_dropped": len(synthetic) - len(verified),
            "web-rewrites": len(rewrites)}


# ---------------------------------------------------------------- 3. tokenizer and stores

def make_stores(cfg: MixtureExperiment, data: Path, stores: Path) -> dict:
    from phijax.data.store import TokenStore, build_store
    from phijax.data.tokenizer import Tokenizer, train_tokenizer

    texts = [d["text"] for name in SOURCES for _, d in read_jsonl(data / f"{name}.jsonl")]
    tok_path = train_tokenizer(texts, data / "tokenizer", cfg.vocab_size,
                               sample_bytes=5_000_000)
    tok = Tokenizer(tok_path)
    tokens = {}
    for name in SOURCES:
        store = build_store([str(data / f"{name}.jsonl")], tok, stores / name, workers=1)
        tokens[name] = len(TokenStore(store))
    sources = [{"name": n, "share": 1 / len(SOURCES), "store": str(stores / n)} for n in SOURCES]
    atomic_write(data / "mixture.yaml", yaml.safe_dump(
        {"max_epochs": cfg.max_epochs, "sources": sources}, sort_keys=False))
    atomic_write(data / "web-synthetic.yaml", yaml.safe_dump(
        {"max_epochs": cfg.max_epochs, "sources": [
            dict(s, share=0.5) for s in sources if s["name"] in ("web", "synthetic")]},
        sort_keys=False))
    return {"tokenizer": str(tok_path), "tokens": tokens}


# ---------------------------------------------------------------- 4. sweeps

def write_sweep(cfg: MixtureExperiment, template: str, out: Path, tokenizer: str) -> Path:
    """A copy of the sweep file `template` that trains on OUT's stores with cfg's steps, seeds
    and overrides; its path."""
    from phijax.config import read_yaml
    raw = read_yaml(ROOT / template if not Path(template).is_file() else template, "sweep file")
    mixture = "web-synthetic.yaml" if "mixture.code" not in str(raw.get("zip")) else "mixture.yaml"
    raw["root"] = str(out / "sweeps")
    raw["base"] = str(ROOT / raw["base"]) if not Path(raw["base"]).is_file() else raw["base"]
    extra = dict(o.split("=", 1) for o in cfg.overrides)
    raw["overrides"] = {**raw.get("overrides", {}), "data.mixture": str(out / "data" / mixture),
                        "data.tokenizer": tokenizer, "model.vocab_size": cfg.vocab_size,
                        "train.steps": cfg.steps, "train.eval_every": cfg.steps,
                        "checkpoint.every": cfg.steps, **{k: yaml.safe_load(v)
                                                          for k, v in extra.items()}}
    shares = raw["name"] == "mixture-shares" and cfg.share_seeds is not None
    raw["seeds"] = list(range(cfg.share_seeds if shares else cfg.seeds))
    path = out / f"{raw['name']}.yaml"
    atomic_write(path, yaml.safe_dump(raw, sort_keys=False))
    return path


def _plans(cells):
    """(cell, mixture, training tokens, `phijax.data.mixture.plan` rows: the `phijax data
    report` table) for every cell that trains on a mixture."""
    from phijax.config import from_dict
    from phijax.data.mixture import MixtureConfig, plan
    from phijax.data.store import TokenStore
    for cell in cells:
        if not cell.mixture:
            continue
        mixture = from_dict(MixtureConfig, cell.mixture)
        t = cell.config.train
        total = t.steps * t.batch_size * cell.config.data.seq_len
        counts = {s.name: len(TokenStore(s.store)) for s in mixture.sources}
        yield cell, mixture, total, plan(mixture, total, counts)


def check_tokens(cells) -> None:
    """ConfigError naming the arm and source when an arm would repeat a source more than its
    mixture's `max_epochs` times (`phijax.data.mixture.plan` over steps x batch x seq_len)."""
    for cell, mixture, total, rows in _plans(cells):
        for row in rows:
            if row["warning"]:
                raise ConfigError(
                    f"arm {cell.label}: source {row['source']} has {row['unique_tokens']} "
                    f"tokens; {row['tokens_seen']:.0f} tokens ({row['share']:g} of {total}) "
                    f"repeat it {row['epochs']:.1f} times, more than max_epochs "
                    f"{mixture.max_epochs:g}; lower --steps or make more data")


def epochs(cells, seed_key: str) -> dict:
    """{arm: {source: epochs}}: how often each arm reads each of its sources."""
    return {arm_name(cell.values, seed_key): {r["source"]: round(r["epochs"], 2) for r in rows}
            for cell, _, _, rows in _plans(cells)}


def run_sweep(path: Path) -> list:
    from phijax.sweep.report import cell_state
    from phijax.sweep.runner import WorkOptions, run_local
    from phijax.sweep.spec import expand, load_sweep

    spec = load_sweep(path)
    cells = expand(spec, path)
    opts = WorkOptions(max_attempts=1, wait=False, poll=1.0)
    check_tokens(cells)
    rc = run_local(str(path), spec, cells, opts, workers=1)
    failed = [c.label for c in cells if cell_state(c, opts.stale_after)["state"] != "success"]
    if rc or failed:
        raise DataError(f"sweep {path}: cells not trained: {', '.join(failed) or rc}; see each "
                        f"cell's train.log under {spec.root}/{spec.name}")
    return cells


# ---------------------------------------------------------------- 5. eval, 6. table

def evaluate_cell(cell, data: Path, out: Path, max_new_tokens: int) -> dict:
    """Per metric, the item scores of `cell`: `phijax eval` on each held-out set, answers and
    choices (cached in OUT/eval/<cell>/<set>/). The cells are base models, so prompts are plain
    text (chat=false), in the training documents' formats."""
    from phijax.eval.harness import HarnessConfig, run_eval
    for name, files in SETS.items():
        if not (out / name / "results.json").is_file():
            new = max_new_tokens if name == "reasoning" else min(16, max_new_tokens)
            run_eval(cell.dir, HarnessConfig(
                tasks=list(files), max_new_tokens=new, chat=False,
                paths={task: str(data / file) for task, file in files.items()}), out / name)
    return {metric: [r["score"] for _, r in read_jsonl(out / name / "items" / f"{task}.jsonl")]
            for (name, task), metric in METRICS.items()}


def arm_name(values: dict, seed_key: str) -> str:
    shares = {k[len("mixture."):]: v for k, v in values.items() if k.startswith("mixture.")}
    used = tuple(sorted(n for n, v in shares.items() if v))
    if set(shares) == set(SOURCES) and used in ARM_NAMES:
        return ARM_NAMES[used]
    from phijax.sweep.spec import label_of
    return label_of({k: v for k, v in values.items() if k != seed_key})


def summarize(scores: dict) -> list[dict]:
    """Rows {arm, seeds, reasoning: {accuracy, stderr, n}, knowledge: ...} from
    {arm: [per-seed {set: item scores}]}; items pooled over seeds."""
    from phijax.eval.accuracy import mean_stderr
    rows = []
    for arm, per_seed in scores.items():
        row = {"arm": arm, "seeds": len(per_seed)}
        for name in METRICS.values():
            pooled = [s for seed in per_seed for s in seed[name]]
            acc, err = mean_stderr(pooled)
            row[name] = {"accuracy": acc, "stderr": err, "n": len(pooled)}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    names = list(METRICS.values())
    lines = ["| arm | seeds | " + " | ".join(f"{LABELS[n]} ± stderr" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seeds']} | " + " | ".join(
            f"{r[n]['accuracy']:.3f} ± {r[n]['stderr']:.3f}" for n in names) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, shares: list[float] | None = None) -> Path:
    """Two panels, answers and choices (chance marked), reasoning and knowledge in each, with
    standard errors: bars per arm, or lines against the synthetic share when `shares`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(2.4 * len(rows) + 4, 4.2))
    for ax, kind in zip(axes, ("answer", "choice")):
        names = [n for n in METRICS.values() if n.endswith("_choice") == (kind == "choice")]
        for k, name in enumerate(names):
            ys, errs = [r[name]["accuracy"] for r in rows], [r[name]["stderr"] for r in rows]
            if shares is not None:
                ax.errorbar(shares, ys, yerr=errs, marker="o", capsize=3, label=LABELS[name])
            else:
                xs = [i + (k - 0.5) * 0.38 for i in range(len(rows))]
                ax.bar(xs, ys, 0.38, yerr=errs, capsize=3, label=LABELS[name])
        if kind == "choice":
            ax.axhline(0.25, color="grey", linestyle=":", label="chance (4 choices)")
        if shares is not None:
            ax.set_xlabel("synthetic share of training tokens (rest web)")
        else:
            ax.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=20, ha="right")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{kind}s")
        ax.legend(fontsize=8)
    fig.suptitle("Pre-training mixture at equal tokens (toy world)")
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------- the command

def run(cfg: MixtureExperiment) -> dict:
    out = Path(cfg.out)
    data = out / "data"
    t0 = time.perf_counter()
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "world" not in results:
        results["world"] = make_data(cfg, data)
    if "generated" not in results:
        results["generated"] = make_generated(cfg, data, out / "pipelines")
    if "stores" not in results:
        results["stores"] = make_stores(cfg, data, out / "stores")
    atomic_write(results_path, json.dumps(results, indent=1))
    tables, read = {}, {}
    for template in cfg.sweeps:
        path = write_sweep(cfg, template, out, results["stores"]["tokenizer"])
        cells = run_sweep(path)
        from phijax.sweep.spec import load_sweep
        seed_key = load_sweep(path).seed_key
        scores: dict = {}
        for cell in cells:
            scores.setdefault(arm_name(cell.values, seed_key), []).append(
                evaluate_cell(cell, data, out / "eval" / cell.name, cfg.max_new_tokens))
        rows = summarize(scores)
        name = path.stem
        tables[name] = rows
        read[name] = epochs(cells, seed_key)
        atomic_write(out / f"{name}.md", format_table(rows) + "\n")
        share = {arm_name(c.values, seed_key): c.values.get("mixture.synthetic") for c in cells}
        plot(rows, out / f"{name}.png",
             [share[r["arm"]] for r in rows] if name == "mixture-shares" else None)
    results["tables"], results["epochs"] = tables, read
    results["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(results_path, json.dumps(results, indent=1))
    return results
