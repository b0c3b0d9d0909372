"""Topic classification of organic documents: teacher annotations, then a fast classifier.

Phi-4 amplifies under-represented topics of its web data (arts, history, travel, culture,
entertainment) with topic classifiers distilled from the same LLM annotator as its quality
filter. Here, as `tools.quality` does for quality:

1. `tools.corpus.annotate`: a seeded sample of `annotate.documents` input documents (each cut to
   `annotate.max_chars`) goes through a one-stage teacher pipeline, the `topic_label` stage
   (tools/templates/topic_label.txt: the teacher picks one of `topics`, replying "Topic:
   NAME"): cached, resumable, sharded like any pipeline run (OUTPUT/annotate/run). The parsed
   labels are written to OUTPUT/labels.jsonl (id, text, topic).
2. `train`: a multinomial logistic regression (scikit-learn, lbfgs) on `tools.quality`'s
   hashed word 1-2-gram features, fitted on the labels but a seeded held-out share, whose
   accuracy is printed; saved as OUTPUT/topics.npz (no pickle: the non-zero weights, the
   intercepts, the topics and the feature settings as JSON).
3. `tools.corpus.balance` predicts every input document's topic and resamples.

The three steps share one config, configs/corpus/topics.yaml (`TopicsConfig`).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from phijax.config import load, positive, ranged
from phijax.data.readers import Skipped, plan_files, read_shard
from phijax.errors import ConfigError, DataError
from phijax.files import atomic_open, read_text_records
from tools.teacher import TeacherConfig

_TOPIC_LINE = re.compile(r"topic\s*[:=]\s*\**\s*([^\n*]+)", re.IGNORECASE)


@dataclass
class AnnotateConfig:
    documents: int = positive(2000)   # documents the teacher labels (a seeded sample)
    max_chars: int = positive(6000)   # each cut to this many characters for the prompt
    shards: int = ranged(1, ge=1)     # of the pipeline run
    max_tokens: Optional[int] = positive(None)  # of the teacher's reply


@dataclass
class TrainConfig:
    holdout: float = ranged(0.1, ge=0.0, lt=1.0)
    n_features: int = positive(2**18)
    bigrams: bool = True
    C: float = positive(1.0)          # inverse L2 strength


@dataclass
class BalanceConfig:
    max_repeats: int = positive(4)    # copies of a document at most (upsampling)
    batch_size: int = positive(4096)  # documents classified at once


@dataclass
class TopicsConfig:
    inputs: list[str] = field(default_factory=list)  # JSONL files or directories (.zst, .gz)
    output: str = ""                  # annotate/, labels.jsonl, topics.npz, balanced/, balance.json
    glob: Optional[str] = None
    text_field: str = "text"
    topics: list[str] = field(default_factory=list)
    targets: dict = field(default_factory=dict)   # topic -> share of documents after balancing
    seed: int = 0
    teacher: Optional[TeacherConfig] = None       # an OpenAI-compatible endpoint (annotate)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)

    def check(self) -> None:
        if not self.output:
            raise ConfigError("output: required (the directory the topic steps write)")
        try:
            check_topics(self.topics)
        except ValueError as e:
            raise ConfigError(f"topics: {e}") from None
        for topic, share in self.targets.items():
            if topic not in self.topics:
                raise ConfigError(f"targets.{topic}: not one of topics ({', '.join(self.topics)})")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or \
                    not 0 <= share < 1:
                raise ConfigError(f"targets.{topic}: a share in [0, 1), got {share!r}")
        if sum(self.targets.values()) >= 1:
            raise ConfigError(f"targets: the shares add up to {sum(self.targets.values()):g}; "
                              f"they must leave room for the other topics (< 1)")

    def check_inputs(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: required (JSONL files or directories of documents)")
        for path in self.inputs:
            if not Path(path).exists():
                raise ConfigError(f"inputs: {path} does not exist")

    def path(self, name: str) -> Path:
        return Path(self.output) / name


def load_topics_config(path: str | None, overrides: list[str] = ()) -> TopicsConfig:
    cfg = load(TopicsConfig, path, overrides, what="topics config")
    cfg.check()
    return cfg


def check_topics(topics: Sequence[str]) -> None:
    """ValueError for an empty list, a blank, repeated (case-insensitively) or multi-line name."""
    if not topics:
        raise ValueError("expected a non-empty list of topic names")
    seen = set()
    for t in topics:
        if not isinstance(t, str) or not t.strip() or "\n" in t:
            raise ValueError(f"{t!r} is not a one-line name")
        if t.strip().lower() in seen:
            raise ValueError(f"{t!r} is listed twice")
        seen.add(t.strip().lower())


def parse_topic(reply: str | None, topics: Sequence[str]) -> str | None:
    """The listed topic the reply's last "Topic: NAME" names (case, markdown bold and final
    punctuation tolerated), in the list's spelling; None when there is none."""
    found = _TOPIC_LINE.findall(reply or "")
    if not found:
        return None
    name = found[-1].strip().strip(".\"'`").strip().lower()
    return next((t for t in topics if t.strip().lower() == name), None)


def iter_documents(cfg: TopicsConfig) -> Iterator[tuple[str, str, dict]]:
    """(id, text, the record's other fields) of every input document, in a fixed order; a
    record that cannot be read stops with its file and line."""
    skipped = Skipped(strict=True)
    for path in cfg.inputs:
        for shard in plan_files(path, cfg.glob, 1 << 60, skipped):
            if shard.kind != "jsonl":
                raise ConfigError(f"inputs: {shard.paths[0]} is not JSONL (.jsonl, .jsonl.gz, "
                                  f".jsonl.zst)")
            for record in read_shard(shard, cfg.text_field, skipped):
                if record.text is not None:
                    yield record.id, record.text, record.metadata


# ---------------------------------------------------------------- classifier

class TopicClassifier:
    """Softmax regression over `tools.quality.featurize` features; `predict` -> topic indices."""

    def __init__(self, topics: list[str], weights: np.ndarray, intercepts: np.ndarray,
                 n_features: int, bigrams: bool):
        self.topics, self.n_features, self.bigrams = list(topics), n_features, bigrams
        self.weights = np.asarray(weights, np.float64)        # (n_features, topics)
        self.intercepts = np.asarray(intercepts, np.float64)  # (topics,)

    @classmethod
    def train(cls, texts: Sequence[str], labels: Sequence[str], topics: list[str], seed: int = 0,
              config: TrainConfig | None = None) -> "TopicClassifier":
        from sklearn.linear_model import LogisticRegression

        from tools.quality import featurize
        config = config or TrainConfig()
        present = [t for t in topics if t in set(labels)]
        if len(present) < 2:
            raise DataError(f"the labels name {len(present)} topic(s); training needs two")
        y = np.array([present.index(t) for t in labels])
        X = featurize(texts, config.n_features, config.bigrams)
        model = LogisticRegression(C=config.C, max_iter=1000, random_state=seed).fit(X, y)
        coef, intercept = model.coef_, model.intercept_
        if len(present) == 2:  # scikit-learn fits one logit for two classes
            coef, intercept = np.vstack([0 * coef, coef]), np.array([0.0, intercept[0]])
        weights = np.zeros((config.n_features, len(topics)))
        biases = np.full(len(topics), -np.inf)  # a topic without labels is never predicted
        for k, t in enumerate(present):
            weights[:, topics.index(t)], biases[topics.index(t)] = coef[k], intercept[k]
        return cls(topics, weights, biases, config.n_features, config.bigrams)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        from tools.quality import featurize
        logits = featurize(list(texts), self.n_features, self.bigrams) @ self.weights
        return np.argmax(logits + self.intercepts, axis=1)

    def save(self, path) -> Path:
        rows, cols = np.nonzero(self.weights)
        meta = {"topics": self.topics, "n_features": self.n_features, "bigrams": self.bigrams}
        with atomic_open(path) as f:  # np.savez on a file object: no ".npz" appended
            np.savez(f, rows=rows, cols=cols, values=self.weights[rows, cols],
                     intercepts=self.intercepts, config=np.array(json.dumps(meta)))
        return Path(path)

    @classmethod
    def load(cls, path) -> "TopicClassifier":
        if not Path(path).is_file():
            raise ConfigError(f"{path} does not exist; write it with `phijax-tools topics train`")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["config"]))
            weights = np.zeros((meta["n_features"], len(meta["topics"])))
            weights[z["rows"], z["cols"]] = z["values"]
            return cls(meta["topics"], weights, z["intercepts"], meta["n_features"],
                       meta["bigrams"])


def train(cfg: TopicsConfig) -> dict:
    """Fit on OUTPUT/labels.jsonl but a seeded held-out share; save OUTPUT/topics.npz."""
    path = cfg.path("labels.jsonl")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; write it with `phijax-tools topics annotate`")
    records = read_text_records(path, "text", required=("topic",))
    unknown = sorted({r["topic"] for r in records} - set(cfg.topics))
    if unknown:
        raise DataError(f"{path}: topics {', '.join(map(repr, unknown))} are not in `topics`")
    order = np.random.default_rng(cfg.seed).permutation(len(records))
    n_hold = int(round(len(records) * cfg.train.holdout))
    hold, fit = [records[i] for i in order[:n_hold]], [records[i] for i in order[n_hold:]]
    clf = TopicClassifier.train([r["text"] for r in fit], [r["topic"] for r in fit],
                                cfg.topics, cfg.seed, cfg.train)
    clf.save(cfg.path("topics.npz"))
    stats = {"trained_on": len(fit), "held_out": n_hold, "model": str(cfg.path("topics.npz"))}
    if hold:
        pred = clf.predict([r["text"] for r in hold])
        stats["accuracy"] = float(np.mean([cfg.topics[p] == r["topic"]
                                           for p, r in zip(pred, hold)]))
        print(f"held-out: n={n_hold} accuracy={stats['accuracy']:.3f}", file=sys.stderr)
    return stats
