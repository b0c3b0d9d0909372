"""phijax-tools: offline data preparation around phijax.

    run       run or resume a teacher pipeline (PIPELINE.yaml [key=value ...])
    pts       Pivotal Token Search: single-token DPO pairs from a checkpoint's rollouts
    judge     judge-guided DPO pairs: two sampled answers compared by a teacher
    seeds     seed records from documents and code: chunk | code | dedup
    decontam  n-gram decontamination against eval sets: build | filter
    quality   the non-LLM quality classifier: train | eval | score
    corpus    organic data: extract, language ID, heuristic filters, dedup (CONFIG [key=value ...])
    topics    topic balancing of organic data: annotate | train | balance (CONFIG [key=value ...])

Commands that take a config (run, pts, judge) read their settings as `key=value` overrides, as
`phijax train` does.
"""
# Handlers import their libraries when they run, so `--help` and argument errors are fast.
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from phijax.cli import run_main
from phijax.errors import ConfigError


def _model_command(sub, name: str, help_: str, records: tuple[str, str], out: str, config: str,
                   example: str) -> argparse.ArgumentParser:
    """A command over a run directory and a JSONL input, writing `--out`, configured by
    `--config FILE` and `key=value` overrides."""
    p = sub.add_parser(name, help=help_)
    p.add_argument("model", metavar="RUN",
                   help="run directory (config.yaml, its tokenizer, checkpoints/)")
    p.add_argument("records", metavar=records[0], help=records[1])
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--config", help=config)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"dotted config overrides, e.g. {example}")
    return p


# ---------------------------------------------------------------- run

def _run(args) -> int:
    from tools.pipeline import PipelineFailed, load_pipeline, run_pipeline, run_pipeline_ray

    if args.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--executor ray: ray is not installed; pip install ray") from None
    pipe = load_pipeline(args.pipeline, args.overrides)
    if args.check:
        print(f"ok: {args.pipeline}: {len(pipe.stages)} stages, {pipe.shards} shards, "
              f"output {pipe.output}")
        return 0
    import logging
    for noisy in ("httpx", "httpx2"):   # a line per teacher request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.main_process:  # a real process: SIGTERM saves finished seeds like Ctrl-C does
        import signal

        def _term(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, _term)
    try:
        if args.executor == "ray":
            summary = run_pipeline_ray(pipe, progress=not args.no_progress,
                                       retry_failed=args.retry_failed,
                                       num_cpus=args.ray_num_cpus)
        else:
            summary = asyncio.run(run_pipeline(pipe, progress=not args.no_progress,
                                               retry_failed=args.retry_failed))
    except KeyboardInterrupt:
        print("interrupted; finished seeds are saved, rerun to resume", file=sys.stderr)
        return 130
    except PipelineFailed as e:   # everything is written; too many seeds failed
        print(json.dumps(e.summary))
        print(f"phijax-tools: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run or resume a teacher pipeline",
                       epilog="exit status: 0 done; 1 more than max_failed_fraction of the seeds "
                       "failed (failures.jsonl has each); 2 a mistake in the pipeline or an "
                       "endpoint that refuses the key or model; 130 interrupted")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. shards=8 teacher.concurrency=16 stages.0.n=2")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one process, one async teacher (default); ray: needs ray")
    p.add_argument("--ray-num-cpus", type=int, default=None, metavar="N",
                   help="--executor ray without RAY_ADDRESS: CPUs of the local Ray instance "
                   "(default: all); one shard task per CPU at a time")
    p.add_argument("--retry-failed", action="store_true",
                   help="process seeds recorded in failures.jsonl again")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--check", action="store_true",
                   help="validate the pipeline (its stages, templates and record fields against "
                   "the first seed) and exit (no network)")
    p.set_defaults(fn=_run)


# ---------------------------------------------------------------- pts

def _pts(args) -> int:
    from phijax.config import load
    from phijax.eval.questions import load_questions
    from phijax.files import write_jsonl
    from tools.pts import PTSConfig, run_pts

    cfg = load(PTSConfig, args.config, args.overrides)
    cfg.validate()
    questions = load_questions(args.records)
    from phijax.sampling import load_sampler  # JAX only once the inputs are known good
    sampler, tokenizer = load_sampler(args.model)
    pairs, stats = run_pts(sampler, tokenizer, questions, cfg,
                           log=(lambda line: None) if args.quiet else None)
    write_jsonl(args.out, pairs)
    print(json.dumps(stats.summary()))
    return 0


def _add_pts(sub) -> None:
    p = _model_command(sub, "pts", "Pivotal Token Search: single-token DPO pairs",
                       ("QUESTIONS", "question JSONL (id, kind, prompt or prompt_ids, answer)"),
                       "pairs JSONL, written atomically", "YAML of PTS settings",
                       "rollouts=64 recheck=256 p_gap=0.2 max_new_tokens=512")
    p.add_argument("--quiet", action="store_true", help="no per-round log lines")
    p.set_defaults(fn=_pts)


# ---------------------------------------------------------------- judge

def _judge(args) -> int:
    from phijax.config import load
    from tools.judge import JudgeConfig, run_judge

    cfg = load(JudgeConfig, args.config, args.overrides)
    stats = asyncio.run(run_judge(args.model, args.records, args.out, cfg))
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items())
    print(f"judged {stats['prompts']} prompts -> {stats['pairs']} pairs (skipped: {skipped}; "
          f"{stats['teacher_calls']} teacher calls) -> {stats['out']}", file=sys.stderr)
    print(json.dumps(stats))
    return 0


def _add_judge(sub) -> None:
    p = _model_command(sub, "judge", "judge-guided DPO pairs (two samples, compared by a teacher)",
                       ("PROMPTS", "JSONL prompt records (prompt, prompt_ids or messages)"),
                       "JSONL of DPO sequence pairs (token ids)",
                       "YAML of judge settings (teacher: {base_url, model, ...})",
                       "teacher.base_url=http://127.0.0.1:8000/v1 teacher.model=NAME")
    p.set_defaults(fn=_judge)


# ---------------------------------------------------------------- seeds, decontam, quality

def _print_report(report: dict) -> int:
    print(json.dumps(report))
    return 0


def _seeds_chunk(args) -> int:
    from tools.seeds import chunk_file
    return _print_report(chunk_file(args.input, args.output, args.field, args.id_field,
                                    args.max_tokens))


def _seeds_code(args) -> int:
    from tools.seeds import code_file
    return _print_report(code_file(args.input, args.output, args.source_field, args.path_field,
                                   args.max_tokens))


def _seeds_dedup(args) -> int:
    from tools.seeds import dedup_file
    return _print_report(dedup_file(args.input, args.output, args.field, args.threshold))


def _add_seeds(sub) -> None:
    cmds = sub.add_parser("seeds", help="seed records: chunk documents, cut code, deduplicate"
                          ).add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (
            ("chunk", _seeds_chunk, "split each record's text into chunks within a token budget"),
            ("code", _seeds_code, "cut source files into functions and classes"),
            ("dedup", _seeds_dedup, "drop exact and near-duplicate records (MinHash)")):
        s = cmds.add_parser(name, help=help_)
        s.add_argument("input", help="JSONL records")
        s.add_argument("output", help="JSONL records, written atomically")
        if name in ("chunk", "dedup"):
            s.add_argument("--field", default="text")
        if name in ("chunk", "code"):
            s.add_argument("--max-tokens", type=int, default=512)
        if name == "chunk":
            s.add_argument("--id-field", default="id")
        if name == "code":
            s.add_argument("--source-field", default="text")
            s.add_argument("--path-field", default="path")
        if name == "dedup":
            s.add_argument("--threshold", type=float, default=0.8)
        s.set_defaults(fn=fn)


def _decontam_build(args) -> int:
    from tools.decontam import build_index
    return _print_report(build_index(args.evals, args.out, args.text_field, args.whitelist,
                                     args.max_items_per_ngram, args.threshold))


def _decontam_filter(args) -> int:
    from tools.decontam import filter_file
    return _print_report(filter_file(args.input, args.index, args.output, args.removed,
                                     args.text_field))


def _add_decontam(sub) -> None:
    cmds = sub.add_parser("decontam", help="13-gram / 7-gram decontamination against eval sets"
                          ).add_subparsers(dest="cmd", required=True)
    b = cmds.add_parser("build", help="index eval JSONL files")
    b.add_argument("evals", nargs="+")
    b.add_argument("--out", required=True, help="index file (.npz)")
    b.add_argument("--text-field", action="append", help="repeatable; default: text")
    b.add_argument("--whitelist", help="text file, one common phrase per line")
    b.add_argument("--max-items-per-ngram", type=int, default=10)
    b.add_argument("--threshold", type=float, default=0.5)
    b.set_defaults(fn=_decontam_build)
    f = cmds.add_parser("filter", help="drop contaminated records from a JSONL file")
    f.add_argument("input")
    f.add_argument("--index", required=True)
    f.add_argument("--output", required=True)
    f.add_argument("--removed", help="also write removed records (with their hit) here")
    f.add_argument("--text-field", default="text")
    f.set_defaults(fn=_decontam_filter)


def _quality_train(args) -> int:
    from tools.quality import train_file
    train_file(args.data, args.out, args.holdout, args.seed, args.text_field, args.label_field)
    return 0


def _quality_eval(args) -> int:
    from tools.quality import eval_file
    eval_file(args.model, args.data, args.text_field, args.label_field)
    return 0


def _quality_score(args) -> int:
    from tools.quality import score_file
    score_file(args.model, args.input, args.output, args.text_field)
    return 0


def _add_quality(sub) -> None:
    cmds = sub.add_parser("quality", help="quality classifier on teacher labels: train | eval | "
                          "score").add_subparsers(dest="cmd", required=True)
    t = cmds.add_parser("train", help="fit on labelled JSONL (text, score 0-5)")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="model file (.npz)")
    t.add_argument("--holdout", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_quality_train)
    e = cmds.add_parser("eval", help="accuracy and Cohen's kappa against held-out labels")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.set_defaults(fn=_quality_eval)
    s = cmds.add_parser("score", help="P(high quality) per record, written as its `quality` field")
    s.add_argument("--model", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.set_defaults(fn=_quality_score)
    for c in (t, e, s):
        c.add_argument("--text-field", default="text")
    for c in (t, e):
        c.add_argument("--label-field", default="score")


# ---------------------------------------------------------------- corpus

def _corpus_run(args) -> int:
    from tools.corpus.config import load_corpus_config
    from tools.corpus.runner import format_summary, run_corpus

    cfg = load_corpus_config(args.config, args.overrides)
    if args.check:
        print(f"ok: {args.config}: steps {', '.join(cfg.steps)}, output {cfg.output}")
        return 0
    summary = run_corpus(cfg, progress=not args.no_progress)
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _add_corpus(sub) -> None:
    cmds = sub.add_parser("corpus", help="organic data: extract, language ID, heuristic "
                          "filters, dedup").add_subparsers(dest="cmd", required=True)
    r = cmds.add_parser("run", help="run or resume a corpus config (reruns skip finished "
                        "shards)")
    r.add_argument("config", help="corpus YAML, e.g. configs/corpus/web.yaml")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. inputs=[crawl/] output=out "
                   "langid.languages=[en] dedup.bands=20")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    r.add_argument("--check", action="store_true", help="validate the config and exit")
    r.set_defaults(fn=_corpus_run)


# ---------------------------------------------------------------- topics

def _topics(args) -> int:
    from tools.corpus.topics import load_topics_config
    cfg = load_topics_config(args.config, args.overrides)
    if args.cmd == "annotate":
        import logging

        from tools.corpus.annotate import annotate
        for noisy in ("httpx", "httpx2"):   # a line per teacher request otherwise
            logging.getLogger(noisy).setLevel(logging.WARNING)
        return _print_report(annotate(cfg, progress=not args.no_progress))
    if args.cmd == "train":
        from tools.corpus.topics import train
        return _print_report(train(cfg))
    from tools.corpus.balance import balance
    return _print_report(balance(cfg))


def _add_topics(sub) -> None:
    cmds = sub.add_parser("topics", help="topic balancing: teacher labels, a classifier, a "
                          "resampler").add_subparsers(dest="cmd", required=True)
    for name, help_ in (
            ("annotate", "the teacher labels a sample of documents -> OUTPUT/labels.jsonl"),
            ("train", "fit the topic classifier on the labels -> OUTPUT/topics.npz"),
            ("balance", "classify every document and resample so the targeted topics reach "
             "their shares -> OUTPUT/balanced/, OUTPUT/balance.json")):
        c = cmds.add_parser(name, help=help_)
        c.add_argument("config", help="topics YAML, e.g. configs/corpus/topics.yaml")
        c.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. inputs=[corpus-out/en] output=topics "
                       "teacher.base_url=http://127.0.0.1:8000/v1 'targets={history: 0.1}'")
        if name == "annotate":
            c.add_argument("--no-progress", action="store_true", help="no tqdm bar")
        c.set_defaults(fn=_topics)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phijax-tools", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_pts, _add_judge, _add_seeds, _add_decontam, _add_quality,
                _add_corpus, _add_topics):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.set_defaults(main_process=argv is None)
    return run_main(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
