"""Stages that keep, drop, score or split records without changing their content much.

* `decontaminate`: drops records whose text hits a saved `tools.decontam` index, counting hits
  by benchmark.
* `quality_label`: the teacher scores the text 0-5 with `tools/templates/quality_score.txt`
  (= `tools.quality.SCORE_PROMPT`) -> `quality_score`; an unparsable reply drops the record.
* `topic_label`: the teacher names the text's topic, one of `topics`, with
  `tools/templates/topic_label.txt` -> `topic`; an unparsable reply drops the record.
* `quality_filter`: a saved `tools.quality.QualityClassifier` scores the text; records with
  P(high quality) >= `threshold` are kept with `quality_prob`.
* `chunk`: the text split by `tools.seeds.chunk_document` (`max_tokens`), one record per chunk
  (no teacher). Corpus-wide dedup needs the whole corpus, so it is not a stage:
  `phijax-tools seeds dedup`.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional

from phijax.config import positive, ranged
from phijax.hashing import file_sha256
from tools.pipeline.stage import (PipelineError, Stage, StageConfig, StageContext, child_record,
                                  file_field, get_field, get_text, record_field, register_stage)
from tools.stages.templated import SamplingConfig, TemplatedStage


def _load(loader: Callable[[str], Any], path: str, key: str) -> Any:
    """A model or index file loaded at build time; a file that does not load is a config error."""
    try:
        return loader(path)
    except Exception as e:  # noqa: BLE001 - a bad file is a config error
        raise PipelineError(f"{key}: cannot load {path}: {e}") from None


# ---------------------------------------------------------------- decontamination

@dataclass(kw_only=True)
class DecontaminateConfig(StageConfig):
    index: str = file_field(dataclasses.MISSING, hint="write it with `phijax-tools decontam "
                            "build EVALS.jsonl ... --out {path}`")
    field: list[str] = record_field(factory=lambda: ["text"])   # joined by newlines


@register_stage("decontaminate")
class DecontaminateStage(Stage):
    """Drop records whose text hits a saved decontamination index (`tools.decontam`).

    `field` is a field name or a list of them, joined by newlines (lists inside a field are
    flattened). Kept records pass unchanged (same id). `stats`: kept, dropped_contaminated;
    `hits_by_benchmark` / `hits_by_kind` count the dropped records (this process's share). The
    index file's sha256 is part of the stage fingerprint.
    """
    Config = DecontaminateConfig

    def __init__(self, cfg: DecontaminateConfig, key: str):
        super().__init__(cfg, key)
        from tools.decontam import Index
        self.index = _load(Index.load, cfg.index, f"{key}.index")
        self.hashes["index_sha256"] = file_sha256(cfg.index)
        self.hits_by_benchmark: Counter = Counter()
        self.hits_by_kind: Counter = Counter()

    def text(self, record: dict) -> str:
        parts = []
        for f in self.cfg.field:
            v = get_field(record, f)
            if isinstance(v, (list, tuple)):
                parts.extend(str(x) for x in v)
            elif v is not None:
                parts.append(v if isinstance(v, str) else str(v))
        return "\n".join(parts)

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        hit = self.index.check(self.text(record))
        if hit is None:
            self.stats["kept"] += 1
            return [record]
        self.stats["dropped_contaminated"] += 1
        self.hits_by_benchmark[hit.benchmark] += 1
        self.hits_by_kind[hit.kind] += 1
        return []


# ---------------------------------------------------------------- quality annotation / filter

@dataclass(kw_only=True)
class QualityLabelConfig(SamplingConfig):
    temperature: float = ranged(0.0, ge=0)
    field: str = record_field("text")             # `{text}` in the template
    template_file: Optional[str] = file_field()   # default tools/templates/quality_score.txt


@register_stage("quality_label")
class QualityLabelStage(TemplatedStage):
    """The teacher scores a document 0-5 for educational/reasoning value (the labels that
    `tools.quality.QualityClassifier` is trained on).

    Output field `quality_score` (int 0-5, parsed with `tools.quality.parse_score`); the
    provenance entry keeps the teacher's reply. A reply without a parsable score drops the
    record (`stats["dropped_unparsed"]`); kept records count as `kept` and per score as
    `score_<N>`.
    """
    Config = QualityLabelConfig
    TEMPLATE_FILES = {"quality_score": ("template_file", "quality_score.txt")}
    VIEWS = {"quality_score": ("text",)}
    ADDS = ("quality_score",)

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        from tools.quality import parse_score
        text = get_field(record, self.cfg.field)
        reply, score = await self.ask_parsed(ctx, "quality_score", dict(record, text=text),
                                             parse_score, "dropped_unparsed")
        if score is None:
            return []
        self.stats.update(["kept", f"score_{score}"])
        return [dict(self.output(record, ctx, reply=reply), quality_score=score)]


@dataclass(kw_only=True)
class TopicLabelConfig(SamplingConfig):
    temperature: float = ranged(0.0, ge=0)
    topics: list[str] = dataclasses.field(default_factory=list)  # the names the teacher picks from
    field: str = record_field("text")             # `{text}` in the template
    template_file: Optional[str] = file_field()   # default tools/templates/topic_label.txt


@register_stage("topic_label")
class TopicLabelStage(TemplatedStage):
    """The teacher names the document's topic, one of `topics` (listed one per line as
    `{topics}` in the template; the labels `tools.corpus.topics.TopicClassifier` learns).

    Output field `topic` (the configured spelling, parsed with `tools.corpus.topics.parse_topic`);
    the provenance entry keeps the reply. A reply naming no listed topic drops the record
    (`stats["dropped_unparsed"]`); kept records count as `kept` and per topic as `topic_<name>`.
    """
    Config = TopicLabelConfig
    TEMPLATE_FILES = {"topic_label": ("template_file", "topic_label.txt")}
    VIEWS = {"topic_label": ("text", "topics")}
    ADDS = ("topic",)

    def __init__(self, cfg: TopicLabelConfig, key: str):
        super().__init__(cfg, key)
        from tools.corpus.topics import check_topics
        try:
            check_topics(cfg.topics)
        except ValueError as e:
            raise PipelineError(f"{key}.topics: {e}") from None
        self.listed = "\n".join(f"- {t}" for t in cfg.topics)

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        from tools.corpus.topics import parse_topic
        view = dict(record, text=get_field(record, self.cfg.field), topics=self.listed)
        reply, topic = await self.ask_parsed(ctx, "topic_label", view,
                                             lambda r: parse_topic(r, self.cfg.topics),
                                             "dropped_unparsed")
        if topic is None:
            return []
        self.stats.update(["kept", f"topic_{topic}"])
        return [dict(self.output(record, ctx, reply=reply), topic=topic)]


@dataclass(kw_only=True)
class QualityFilterConfig(StageConfig):
    model: str = file_field(dataclasses.MISSING, hint="write it with `phijax-tools quality "
                            "train --data LABELLED.jsonl --out {path}`")
    field: str = record_field("text")
    threshold: float = ranged(0.5, ge=0, le=1)


@register_stage("quality_filter")
class QualityFilterStage(Stage):
    """Keep records whose text a saved `tools.quality.QualityClassifier` scores >= `threshold`.

    The model is loaded and checked when the pipeline is built. Kept records get
    `quality_prob` (P(high quality), rounded to 6 places) and a provenance entry (id
    `<id>/<stage>/0`); records below the threshold are dropped. `stats`: kept,
    dropped_low_quality. The model file's sha256 is part of the stage fingerprint.
    """
    Config = QualityFilterConfig
    ADDS = ("quality_prob",)

    def __init__(self, cfg: QualityFilterConfig, key: str):
        super().__init__(cfg, key)
        from tools.quality import QualityClassifier
        self.model = _load(QualityClassifier.load, cfg.model, f"{key}.model")
        self.hashes["model_sha256"] = file_sha256(cfg.model)

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        prob = float(self.model.score([get_text(record, self.cfg.field)])[0])
        if prob < self.cfg.threshold:
            self.stats["dropped_low_quality"] += 1
            return []
        self.stats["kept"] += 1
        out = child_record(record, self, 0, model_sha256=self.hashes["model_sha256"],
                           threshold=self.cfg.threshold)
        out["quality_prob"] = round(prob, 6)
        return [out]


# ---------------------------------------------------------------- chunking

@dataclass(kw_only=True)
class ChunkConfig(StageConfig):
    field: str = record_field("text")
    max_tokens: int = positive(512)    # words


@register_stage("chunk")
class ChunkStage(Stage):
    """Split a record's text into chunks within a token budget (`tools.seeds.chunk_document`,
    words as tokens); no teacher call.

    One output record per chunk, the chunk replacing the field; ids `<id>/<stage>/<chunk
    index>` (stable for the same text and budget); the provenance entry has `chunks` (how
    many) and `max_tokens`. A text with no content gives no record (`stats["dropped_empty"]`);
    `stats["chunks"]` counts the chunks written.
    """
    Config = ChunkConfig

    async def run(self, record: dict, ctx: StageContext) -> list[dict]:
        from tools.seeds import chunk_document
        chunks = chunk_document(get_text(record, self.cfg.field), max_tokens=self.cfg.max_tokens)
        if not chunks:
            self.stats["dropped_empty"] += 1
            return []
        self.stats["chunks"] += len(chunks)
        outs = []
        for i, chunk in enumerate(chunks):
            out = child_record(record, self, i, chunks=len(chunks), max_tokens=self.cfg.max_tokens)
            out[self.cfg.field] = chunk
            outs.append(out)
        return outs
