"""Data system throughput: tokenization against a plain sentencepiece loop, and the loader
against what the bench-cpu-53m train step consumes.

One run measures, on this machine:
  1. tokenization (best of `--repeats` alternating runs of each side): the `phijax data
     tokenize` command (sharded, one worker process per core), timed from its start to its
     exit, over a JSONL corpus made of the standard library's .py files (five files, one per
     source of the Table 5 mixture, `--mb` MB in all): reading, JSON, encoding, writing the
     TensorStore arrays. Peer: a single-process loop calling
     `SentencePieceProcessor.encode(text)` once per document over the same texts, already in
     memory. Both use the same tokenizer (`--vocab-size` pieces, trained once and cached).
  2. loader: batches of `--batch` rows of seq_len 4096 from the five stores mixed by the paper's
     shares (web 15%, web rewrites 15%, synthetic 40%, code 20%, acquired 10%), with the
     library's Grain pipeline (2 threads, prefetch 2), each batch put on the device as the train
     step receives it. Peer: tokens/s of the `configs/bench-cpu-53m.yaml` train step (median of
     `--train-steps` steps after one warm-up, synthetic tokens, one device).

Targets: tokenization >= 1.7x the sentencepiece loop; loader >= 50x the train step.
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import jax

from phijax.config import load_config
from phijax.data.corpus import documents
from phijax.data.loader import Windows, batches, split_windows, synthetic_batches
from phijax.data.mixture import BlockMixer
from phijax.data.store import TokenStore, build_store, default_workers
from phijax.data.tokenizer import Tokenizer, train_tokenizer
from phijax.sharding import make_mesh
from phijax.train.step import build_trainer

ROOT = Path(__file__).resolve().parents[1]
TARGET_TOKENIZE, TARGET_LOADER = 1.7, 50.0
SOURCES = {"web": 0.15, "web-rewrites": 0.15, "synthetic": 0.40, "code": 0.20, "acquired": 0.10}


def write_corpus(work: Path, megabytes: float) -> list[str]:
    """Five JSONL files of stdlib source files, `megabytes` in all; returns every text."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("**/*.py"))
    texts, size = [], 0
    while size < megabytes * 1e6:  # repeat the stdlib if it is smaller than asked
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                texts.append(text)
                size += len(text.encode())
                if size >= megabytes * 1e6:
                    break
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    for k, name in enumerate(SOURCES):
        with open(corpus / f"{name}.jsonl", "w") as out:
            for text in texts[k::len(SOURCES)]:
                out.write(json.dumps({"text": text}) + "\n")
    return texts


def bench_tokenize(tokenizer: Tokenizer, texts: list[str], corpus: Path, work: Path,
                   repeats: int) -> dict:
    """Best of `repeats` alternating runs of each side (this VM's speed drifts). Ours is the
    `phijax data tokenize` command itself, timed from process start to exit."""
    sp = tokenizer.sp
    peer_s, ours_s = [], []
    cmd = [sys.executable, "-m", "phijax", "data", "tokenize", str(corpus),
           "--tokenizer", str(tokenizer.path), "--out", str(work / "all")]
    for _ in range(repeats):
        start = time.perf_counter()
        peer_tokens = sum(len(sp.encode(t)) for t in texts)
        peer_s.append(time.perf_counter() - start)
        shutil.rmtree(work / "all", ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ours_s.append(time.perf_counter() - start)
    store = TokenStore(work / "all")
    peer_s, ours_s = min(peer_s), min(ours_s)
    # The store also holds one <|endoftext|> per document; count only the text's tokens.
    ours_tokens = len(store) - store.documents
    assert ours_tokens == peer_tokens, (ours_tokens, peer_tokens)
    return {"tokens": peer_tokens, "peer_tok_s": peer_tokens / peer_s,
            "ours_tok_s": ours_tokens / ours_s, "peer_s": peer_s, "ours_s": ours_s}


def bench_loader(tokenizer: Tokenizer, corpus: Path, work: Path, batch: int, steps: int,
                 seq_len: int = 4096) -> float:
    stores = [TokenStore(build_store([str(corpus / f"{name}.jsonl")], tokenizer, work / name))
              for name in SOURCES]
    sources = [Windows(s, seq_len, *split_windows(s, seq_len, 0.0)["train"]) for s in stores]
    mixer = BlockMixer(list(SOURCES.values()), seed=0, block=100)
    device = jax.devices()[0]
    it = batches(sources, mixer, batch, seed=0, start_step=0, stop_step=steps + 2)
    jax.device_put(next(it), device)  # threads started, first reads done
    start = time.perf_counter()
    for b in it:
        jax.block_until_ready(jax.device_put(b, device))
    return (steps + 1) * batch * seq_len / (time.perf_counter() - start)


def bench_train_step(steps: int) -> float:
    cfg = load_config(ROOT / "configs" / "bench-cpu-53m.yaml", [])
    t, d = cfg.train, cfg.data
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    trainer = build_trainer(cfg, mesh)
    times = []
    with jax.set_mesh(mesh):
        state = trainer.init()
        for i, b in enumerate(synthetic_batches(cfg.model.vocab_size, t.batch_size, d.seq_len,
                                                0, 0, steps + 1)):
            start = time.perf_counter()
            b = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in b.items()}
            state, metrics = trainer.train_step(state, b)
            metrics["loss"].block_until_ready()
            if i:
                times.append(time.perf_counter() - start)
    return t.batch_size * d.seq_len / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/phijax-data-bench")
    p.add_argument("--mb", type=float, default=96.0, help="corpus size in MB")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8, help="loader rows per batch")
    p.add_argument("--loader-steps", type=int, default=60)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="tokenization runs of each side")
    args = p.parse_args()
    work = Path(args.work)
    tok_path = work / f"sp{args.vocab_size}.model"
    shutil.rmtree(work / "run", ignore_errors=True)
    run = work / "run"
    texts = write_corpus(run, args.mb)
    if not tok_path.is_file():
        print(f"training a {args.vocab_size}-piece tokenizer (cached in {work}) ...", flush=True)
        train_tokenizer(documents(["builtin:python-stdlib", "builtin:python-docs"]),
                        tok_path.with_suffix(""), args.vocab_size)
    tokenizer = Tokenizer(tok_path)

    tok = bench_tokenize(tokenizer, texts, run / "corpus", run, args.repeats)
    loader = bench_loader(tokenizer, run / "corpus", run, args.batch, args.loader_steps)
    train = bench_train_step(args.train_steps)
    result = {
        "bench": "data_throughput", "cores": default_workers(), "corpus_mb": args.mb,
        "corpus_tokens": tok["tokens"], "vocab_size": tokenizer.vocab_size,
        "tokenize_tokens_per_s": round(tok["ours_tok_s"]),
        "sentencepiece_loop_tokens_per_s": round(tok["peer_tok_s"]),
        "tokenize_ratio": round(tok["ours_tok_s"] / tok["peer_tok_s"], 2),
        "tokenize_target": TARGET_TOKENIZE,
        "loader_tokens_per_s": round(loader), "train_step_tokens_per_s": round(train, 1),
        "loader_ratio": round(loader / train, 1), "loader_target": TARGET_LOADER,
        "jax": jax.__version__,
    }
    rows = [("tokenize (phijax, all cores)", result["tokenize_tokens_per_s"], ""),
            ("sentencepiece encode loop (1 process)", result["sentencepiece_loop_tokens_per_s"], ""),
            ("  ratio", result["tokenize_ratio"], f"target >= {TARGET_TOKENIZE}"),
            ("loader, 5-source mix, seq 4096", result["loader_tokens_per_s"], ""),
            ("bench-cpu-53m train step", result["train_step_tokens_per_s"], ""),
            ("  ratio", result["loader_ratio"], f"target >= {TARGET_LOADER}")]
    print(f"\n{'measure':<40} {'tokens/s':>14}")
    for name, value, note in rows:
        print(f"{name:<40} {value:>14,} {note}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
