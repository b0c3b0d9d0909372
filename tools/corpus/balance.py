"""Topic balancing: resample documents so that named topics reach a target share.

`balance(cfg)` classifies every input document with the saved `TopicClassifier`
(OUTPUT/topics.npz), plans how many copies of each topic to write, writes them and reports the
topic shares before and after (a table on stderr, OUTPUT/balance.json).

The unit is **documents**: a target of 0.06 for history means 6% of the written documents
are predicted history (character shares are reported too). Topics without a target are kept
as they are, each document once; a topic with a target gets c_t = round(s_t * total)
documents, where total = (documents of the other topics) / (1 - sum of the targets). Above its
current count a topic is upsampled: every document floor(c_t / n_t) times, and a seeded choice
of c_t mod n_t of them once more; below, a seeded choice of c_t documents is kept (a target
under the current share thins the topic out). No document is written more than
`balance.max_repeats` times: a topic that would need more is capped at max_repeats * n_t
documents and the total recomputed without it, so it falls short of its target (reported as
such, as is a target topic with no documents at all). The choice is seeded by `seed` and the
topic, so a rerun writes the same output. Documents are written in input order, copies next to
each other, each with its predicted `topic`, to OUTPUT/balanced/part-000000.jsonl.zst.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from phijax.errors import DataError
from phijax.files import atomic_write
from tools.corpus.topics import TopicClassifier, TopicsConfig, iter_documents


def plan_counts(counts: dict[str, int], targets: dict[str, float],
                max_repeats: int) -> dict[str, int]:
    """Documents of each topic after balancing (see the module's docstring)."""
    rest = sum(n for t, n in counts.items() if t not in targets)
    if rest == 0:
        raise DataError("every document is in a topic with a target: nothing to balance "
                        "against; leave at least one topic without a target")
    capped: dict[str, int] = {}
    while True:
        free = {t: s for t, s in targets.items() if t not in capped}
        total = (rest + sum(capped.values())) / (1 - sum(free.values()))
        want = {t: int(round(s * total)) for t, s in free.items()}
        over = {t for t, c in want.items() if c > max_repeats * counts.get(t, 0)}
        if not over:
            break
        capped.update({t: max_repeats * counts.get(t, 0) for t in over})
    return {t: want.get(t, capped.get(t, n)) for t, n in counts.items()}


def copies_per_document(topic_of: np.ndarray, plan: dict[int, int], seed: int) -> np.ndarray:
    """How many times each document is written: `plan` maps a topic index to its count."""
    copies = np.ones(len(topic_of), np.int64)
    for k, want in plan.items():
        docs = np.flatnonzero(topic_of == k)
        n = len(docs)
        if n == 0 or want == n:
            continue
        rng = np.random.default_rng([seed, k])
        if want < n:
            copies[docs] = 0
            copies[rng.choice(docs, want, replace=False)] = 1
        else:
            copies[docs] = want // n
            copies[rng.choice(docs, want % n, replace=False)] += 1
    return copies


def shares(topics: list[str], topic_of: np.ndarray, chars: np.ndarray,
           copies: np.ndarray) -> dict:
    docs = np.bincount(topic_of, weights=copies, minlength=len(topics))
    weight = np.bincount(topic_of, weights=copies * chars, minlength=len(topics))
    n, c = max(docs.sum(), 1), max(weight.sum(), 1)
    return {t: {"documents": int(docs[k]), "share": round(float(docs[k] / n), 6),
                "char_share": round(float(weight[k] / c), 6)} for k, t in enumerate(topics)}


def report_table(report: dict) -> str:
    rows = [f"{'topic':<16}{'docs before':>12}{'share':>8}{'docs after':>12}{'share':>8}"
            f"{'target':>8}{'chars before':>13}{'after':>8}"]
    for t in report["topics"]:
        b, a = report["before"][t], report["after"][t]
        target = report["targets"].get(t)
        rows.append(f"{t:<16}{b['documents']:>12}{b['share']:>8.3f}{a['documents']:>12}"
                    f"{a['share']:>8.3f}{'' if target is None else f'{target:.3f}':>8}"
                    f"{b['char_share']:>13.3f}{a['char_share']:>8.3f}")
    rows.append(f"{'total':<16}{report['documents_before']:>12}{'':>8}"
                f"{report['documents_after']:>12}")
    return "\n".join(rows)


def _classify(cfg: TopicsConfig, clf: TopicClassifier) -> tuple[np.ndarray, np.ndarray]:
    """Each input document's predicted topic index (into cfg.topics) and its length."""
    to_cfg = np.array([cfg.topics.index(t) if t in cfg.topics else -1 for t in clf.topics])
    if (to_cfg < 0).any():
        missing = [t for t, k in zip(clf.topics, to_cfg) if k < 0]
        raise DataError(f"the model predicts topics {missing} that are not in `topics`")
    topic_of, chars, batch = [], [], []

    def flush():
        if batch:
            topic_of.append(to_cfg[clf.predict(batch)])
            batch.clear()
    for _, text, _ in iter_documents(cfg):
        batch.append(text)
        chars.append(len(text))
        if len(batch) == cfg.balance.batch_size:
            flush()
    flush()
    return (np.concatenate(topic_of) if topic_of else np.zeros(0, np.int64),
            np.array(chars, np.int64))


def _write(cfg: TopicsConfig, topic_of: np.ndarray, copies: np.ndarray) -> Path:
    import zstandard

    from phijax.files import atomic_open, jsonl_line
    path = cfg.path("balanced/part-000000.jsonl.zst")
    with atomic_open(path) as f, \
            zstandard.ZstdCompressor(level=3).stream_writer(f, closefd=False) as z:
        for i, (_, text, meta) in enumerate(iter_documents(cfg)):
            line = jsonl_line({cfg.text_field: text, **meta, "topic": cfg.topics[topic_of[i]]})
            for _ in range(copies[i]):
                z.write(line.encode("utf-8"))
    return path


def balance(cfg: TopicsConfig) -> dict:
    """Classify, plan, write; the report (also in OUTPUT/balance.json, a table on stderr)."""
    cfg.check_inputs()
    if not cfg.targets:
        raise DataError("targets: none set; name the topics to balance, e.g. "
                        "'targets={history: 0.1}'")
    clf = TopicClassifier.load(cfg.path("topics.npz"))
    topic_of, chars = _classify(cfg, clf)
    if not len(topic_of):
        raise DataError(f"inputs: no documents in {', '.join(cfg.inputs)}")
    counts = {t: int((topic_of == k).sum()) for k, t in enumerate(cfg.topics)}
    plan = plan_counts(counts, cfg.targets, cfg.balance.max_repeats)
    copies = copies_per_document(topic_of, {cfg.topics.index(t): plan[t] for t in cfg.targets},
                                 cfg.seed)
    out = _write(cfg, topic_of, copies)
    report = {"unit": "documents", "topics": cfg.topics, "targets": dict(cfg.targets),
              "seed": cfg.seed, "max_repeats": cfg.balance.max_repeats,
              "documents_before": len(topic_of), "documents_after": int(copies.sum()),
              "before": shares(cfg.topics, topic_of, chars, np.ones_like(copies)),
              "after": shares(cfg.topics, topic_of, chars, copies), "output": str(out)}
    report["short_of_target"] = sorted(
        t for t, s in cfg.targets.items()
        if report["after"][t]["share"] < s - 1 / report["documents_after"])
    atomic_write(cfg.path("balance.json"), json.dumps(report, indent=1) + "\n")
    print(report_table(report), file=sys.stderr)
    for t in report["short_of_target"]:
        print(f"{t}: share {report['after'][t]['share']:.3f} is short of its target "
              f"{cfg.targets[t]:.3f} ({counts[t]} documents, at most {cfg.balance.max_repeats} "
              f"copies each)", file=sys.stderr)
    return report
