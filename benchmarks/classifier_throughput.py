"""Quality-classifier throughput: documents scored per second on ONE core.

Trains `tools.quality.QualityClassifier` on `--train` labelled synthetic documents (teacher-like
0-5 scores from a latent quality with noise, see `synthetic_corpus`), measures agreement with
`--heldout` held-out labels, then scores `--docs` documents of ~`--kb` KB each with BLAS/OpenMP
limited to one thread (threadpoolctl + env) and a single Python process. Peer: scikit-learn's
`HashingVectorizer(ngram_range=(1, 2), alternate_sign=False, n_features=2**20)` followed by the
same linear model, on a slice of the same documents (`--peer-docs`).

Target: >= 10,000 documents/s. The last stdout line is one JSON object.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.quality import QualityClassifier, agreement  # noqa: E402

TARGET = 10_000
NOUNS = ("function", "matrix", "theorem", "variable", "integral", "protein", "circuit", "loop",
         "graph", "vector", "equation", "algorithm", "cell", "force", "array", "proof")
ADJS = ("linear", "recursive", "finite", "stable", "prime", "continuous", "sorted", "convex")
EDU = ("A {n} is defined as a {a} {n2} that maps each input to exactly one output.",
       "For example, if x = {k} then the {n} equals {k2} because each step doubles it.",
       "This means that the {n} converges whenever the {n2} is {a}.",
       "Therefore, we can prove that every {a} {n} has a unique {n2}.",
       "def {n}_{k}(x):\n    \"\"\"Return the {a} {n2} of x.\"\"\"\n    return x * {k}",
       "Step {k}: compute the {n} first, then compare it with the {n2} to check the result.",
       "Why does this work? The {n} is {a}, so the {n2} cannot grow without bound.")
SPAM = ("Click here to get the best {n} deals today!!! Free shipping on all orders.",
        "Buy now and save {k}% on every {n}. Limited time offer, act fast.",
        "Subscribe to our newsletter | Home | About | Contact | Login | Cart",
        "Copyright 20{k} All rights reserved. Cookie policy. Privacy policy. Terms.",
        "Top {k} {n} secrets you won't believe. Sponsored content, sign up now.",
        "Hot {a} {n} sale!!! Lowest price guaranteed, order {k} today and win.")
NEUTRAL = ("The {n} was mentioned in {k} posts this year.",
           "Posted by user{k} on a {a} afternoon about the {n}.",
           "Related: {n}, {n2}, and {k} other topics.")


def synthetic_corpus(n: int, chars: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`n` documents of about `chars` characters and their teacher-like 0-5 scores. Each doc has
    a latent quality q ~ U(0, 1); each sentence is neutral (30%), else educational with
    probability q, spammy otherwise; score = round(5q + N(0, 0.6)) clipped to 0-5."""
    rng = random.Random(seed)
    texts, scores = [], []
    for _ in range(n):
        q = rng.random()
        parts, size = [], 0
        while size < chars:
            pool = NEUTRAL if rng.random() < 0.3 else (EDU if rng.random() < q else SPAM)
            s = rng.choice(pool).format(n=rng.choice(NOUNS), n2=rng.choice(NOUNS),
                                        a=rng.choice(ADJS), k=rng.randint(2, 99),
                                        k2=rng.randint(2, 999))
            parts.append(s)
            size += len(s) + 1
        texts.append(" ".join(parts))
        scores.append(min(5, max(0, round(5 * q + rng.gauss(0, 0.6)))))
    return texts, np.array(scores)


def peer_docs_per_s(clf: QualityClassifier, docs: list[str]) -> float:
    from sklearn.feature_extraction.text import HashingVectorizer
    hv = HashingVectorizer(ngram_range=(1, 2), alternate_sign=False, n_features=2**20)
    t = time.perf_counter()
    for i in range(0, len(docs), 4096):
        _ = hv.transform(docs[i:i + 4096]) @ clf.coef + clf.intercept
    return len(docs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--peer-docs", type=int, default=10_000)
    ap.add_argument("--kb", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3, help="best of N scoring passes")
    args = ap.parse_args()

    with threadpool_limits(limits=1):
        texts, scores = synthetic_corpus(args.train + args.heldout, 600, seed=0)
        clf = QualityClassifier.train(texts[:args.train], scores[:args.train], seed=0)
        agree = agreement(clf.score(texts[args.train:]), scores[args.train:])
        docs, _ = synthetic_corpus(args.docs, int(args.kb * 1000), seed=1)
        mean_kb = sum(len(d.encode()) for d in docs) / len(docs) / 1000
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            clf.score(docs)
            times.append(time.perf_counter() - t)
        ours = args.docs / min(times)
        peer = peer_docs_per_s(clf, docs[:args.peer_docs])

    rows = [("phijax tools.quality (1 core)", f"{ours:,.0f}", f"{ours / TARGET:.2f}x target"),
            ("sklearn HashingVectorizer 1-2g (1 core)", f"{peer:,.0f}", f"{ours / peer:.2f}x peer")]
    print(f"scoring {args.docs:,} docs of {mean_kb:.2f} KB (best of {args.repeats}); "
          f"trained on {args.train:,}, held-out {args.heldout:,}")
    print(f"{'system':42s} {'docs/s':>10s}  ratio")
    for name, v, r in rows:
        print(f"{name:42s} {v:>10s}  {r}")
    print(f"held-out agreement with teacher labels: accuracy {agree['accuracy']:.3f}, "
          f"Cohen's kappa {agree['kappa']:.3f} (n={agree['n']})")
    print(f"target >= {TARGET:,} docs/s: {'PASS' if ours >= TARGET else 'FAIL'}")
    print(json.dumps({"benchmark": "classifier_throughput", "docs": args.docs,
                      "mean_kb": round(mean_kb, 3), "docs_per_s": round(ours, 1),
                      "peer_docs_per_s": round(peer, 1), "target_docs_per_s": TARGET,
                      "pass": ours >= TARGET, "heldout_accuracy": round(agree["accuracy"], 4),
                      "heldout_kappa": round(agree["kappa"], 4), "heldout_n": agree["n"]}))


if __name__ == "__main__":
    main()
