"""Topic labels from the teacher for a seeded sample of the input documents (the first step of
topic balancing; see `tools.corpus.topics`): the sample, cut to `annotate.max_chars`, goes
through a one-stage pipeline, the `topic_label` stage, in OUTPUT/annotate/run (cached,
resumable: a rerun asks only what is not answered yet); the labels go to OUTPUT/labels.jsonl.
"""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import asdict

from phijax.errors import ConfigError, DataError
from phijax.files import atomic_write, write_jsonl
from tools.corpus.topics import TopicsConfig, iter_documents


def sample_documents(cfg: TopicsConfig) -> list[dict]:
    """A seeded uniform sample (reservoir) of `annotate.documents` inputs, in input order."""
    rng, k, reservoir = random.Random(cfg.seed), cfg.annotate.documents, []
    for i, (doc_id, text, _) in enumerate(iter_documents(cfg)):
        seed = {"id": doc_id, "text": text[:cfg.annotate.max_chars]}
        if i < k:
            reservoir.append((i, seed))
        elif (j := rng.randrange(i + 1)) < k:
            reservoir[j] = (i, seed)
    return [seed for _, seed in sorted(reservoir, key=lambda pair: pair[0])]


def annotate(cfg: TopicsConfig, progress: bool = True) -> dict:
    """Label a sample with the teacher (a resumable pipeline run); write OUTPUT/labels.jsonl."""
    from tools.pipeline import load_pipeline, read_records, run_pipeline
    if cfg.teacher is None:
        raise ConfigError("teacher: required to annotate (teacher.base_url=URL "
                          "teacher.model=NAME)")
    cfg.check_inputs()
    seeds = sample_documents(cfg)
    if not seeds:
        raise DataError(f"inputs: no documents in {', '.join(cfg.inputs)}")
    seeds_path = cfg.path("annotate/seeds.jsonl")
    text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in seeds)
    if not seeds_path.is_file() or seeds_path.read_text(encoding="utf-8") != text:
        atomic_write(seeds_path, text)
    stage = {"name": "topic", "type": "topic_label", "topics": cfg.topics,
             "max_tokens": cfg.annotate.max_tokens}
    pipe = load_pipeline(raw={"teacher": asdict(cfg.teacher), "input": str(seeds_path),
                              "output": str(cfg.path("annotate/run")),
                              "shards": cfg.annotate.shards, "stages": [stage]})
    summary = asyncio.run(run_pipeline(pipe, progress=progress))
    sampled = {s["id"] for s in seeds}  # the run directory also keeps earlier samples' labels
    labels = sorted(({"id": r["provenance"]["seed_id"], "text": r["text"], "topic": r["topic"]}
                     for r in read_records(pipe.output) if r["provenance"]["seed_id"] in sampled),
                    key=lambda r: r["id"])
    write_jsonl(cfg.path("labels.jsonl"), labels)
    counts = {t: sum(r["topic"] == t for r in labels) for t in cfg.topics}
    return {"sampled": len(seeds), "labelled": len(labels), "topics": counts,
            "unlabelled": len(seeds) - len(labels),  # unparsed replies, failed requests
            "usage": summary["usage"],
            "labels": str(cfg.path("labels.jsonl"))}
