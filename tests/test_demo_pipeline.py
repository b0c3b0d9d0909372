"""configs/pipelines/demo.yaml end to end: seeds -> rewrite(reasoning) -> difficulty ->
decontaminate against the scripted loopback teacher, then chat JSONL -> token store -> 3 steps of
`phijax train` on it (proves the trainer accepts what the pipeline produces); and the file as
shipped against `phijax serve` on a tiny model, where it stops with one line naming what is in
its way."""
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, read_metrics, run_cli, seven_or_eight_run  # noqa: E402
from teacher_server import start_server  # noqa: E402

from tools.decontam import Index  # noqa: E402
from tools.export import write_chat_jsonl  # noqa: E402
from tools.pipeline import load_pipeline, read_records, run_pipeline  # noqa: E402
from tools.seeds import chunk_document  # noqa: E402

N_SEEDS = 20


def seeds_from_docs(n: int) -> list[dict]:
    """The first chunk of the first `n` Python reference topics (the builtin corpus)."""
    from pydoc_data.topics import topics
    out = []
    for name in sorted(topics):
        chunks = [c for c in chunk_document(topics[name], max_tokens=200) if len(c) > 200]
        if chunks:
            out.append({"id": f"topic-{name}", "text": chunks[0]})
        if len(out) == n:
            return out
    raise AssertionError("not enough topics")


def teacher(seeds: list[dict]):
    """Seed i gets a reasoning task whose k sampled answers are: i % 4 == 0 all agree (too
    easy), i % 4 == 1 none agree (too hard), otherwise a plurality (kept)."""
    index = {s["text"]: i for i, s in enumerate(seeds)}

    def reply(messages, n, i):
        prompt = messages[-1]["content"]
        if prompt.startswith("Turn the passage below into a structured reasoning task"):
            (k,) = [j for t, j in index.items() if t in prompt]
            return (f"### Problem\nTask {k}: count the keywords in reference topic number {k} of "
                    f"the Python language manual and report the total.\n### Solution\n"
                    f"1. Read the topic.\n2. Count.\n\\boxed{{{k + 10}}}")
        m = re.search(r"Problem:\nTask (\d+):", prompt)
        assert m, prompt[:200]
        k = int(m[1])
        if k % 4 == 0:
            return f"\\boxed{{{k + 10}}}"
        if k % 4 == 1:
            return f"\\boxed{{{1000 * k + i}}}"
        return f"So \\boxed{{{k + 10 if i < n - 1 else 7}}}"
    return reply


@pytest.mark.slow
def test_demo_pipeline_to_training(tmp_path, cache_dir):
    seeds = seeds_from_docs(N_SEEDS)
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
    # an eval set that contains task 2's problem verbatim: it must be decontaminated
    evals = tmp_path / "evals" / "toy-bench.jsonl"
    evals.parent.mkdir()
    evals.write_text(json.dumps({"question": "Task 2: count the keywords in reference topic "
                                             "number 2 of the Python language manual and "
                                             "report the total."}) + "\n")
    index = tmp_path / "evals" / "suite.npz"
    Index.build([evals], text_field="question").save(index)

    srv = start_server(responder=teacher(seeds))
    try:
        pipe = load_pipeline(ROOT / "configs" / "pipelines" / "demo.yaml", overrides=[
            f"teacher.base_url={srv.url}", "teacher.model=scripted", "teacher.timeout_s=10",
            "teacher.backoff_base_s=0.005", "teacher.backoff_max_s=0.05",
            f"input={tmp_path / 'seeds.jsonl'}", f"output={tmp_path / 'run'}", "shards=2",
            "stages.1.k=4", f"stages.2.index={index}"])
        summary = asyncio.run(run_pipeline(pipe, progress=False))
    finally:
        srv.stop()
    assert summary["seeds_failed"] == 0
    rewrite, difficulty, decontam = pipe.stages
    assert rewrite.stats == {"kept_reasoning": N_SEEDS}
    assert difficulty.stats == {"kept": 10, "dropped_all_agree": 5, "dropped_none_agree": 5}
    assert decontam.stats == {"kept": 9, "dropped_contaminated": 1}
    assert decontam.hits_by_benchmark == {"toy-bench": 1}
    records = read_records(tmp_path / "run")
    assert len(records) == summary["records"] == 9
    assert not any(r["instruction"].startswith("Task 2:") for r in records)
    r = records[0]
    assert [s["stage"] for s in r["provenance"]["stages"]] == ["rewrite", "difficulty"]
    assert r["reference_answer"] and r["response"].endswith("}")

    chats = tmp_path / "chats.jsonl"
    assert write_chat_jsonl(records, chats) == (9, 0)

    from phijax.data.corpus import documents
    from phijax.data.store import TokenStore, build_store
    from phijax.data.tokenizer import Tokenizer, train_tokenizer
    tok_path = train_tokenizer(documents(["builtin:python-docs"]), tmp_path / "tok", 512,
                               sample_bytes=1_000_000)
    tok = Tokenizer(tok_path)
    assert tok.vocab_size <= 1024                      # configs/tiny.yaml's model.vocab_size
    store = build_store([str(chats)], tok, tmp_path / "store", workers=1)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["documents"] == 9 and len(TokenStore(store)) > 0
    assert (store / "loss_mask").is_dir()              # chats: loss on assistant tokens only

    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(f"sources:\n  - {{name: demo, share: 1.0, store: {store}}}\n")
    run_dir = tmp_path / "train"
    run_cli("train", ROOT / "configs" / "tiny.yaml", "train.steps=3", "train.batch_size=4",
            "train.log_every=1", f"data.mixture={mixture}", f"data.tokenizer={tok_path}",
            f"run.dir={run_dir}", f"data.cache_dir={cache_dir}")
    metrics = read_metrics(run_dir)
    assert metrics and metrics[-1]["step"] == 3
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(loss) and loss > 0 for loss in losses), losses


def tools_cli(cwd: Path, *args) -> subprocess.CompletedProcess:
    """`phijax-tools ARGS` in a fresh process, in `cwd` (the demo's relative paths land there)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    return subprocess.run([str(Path(sys.executable).parent / "phijax-tools"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def tiny_server(tmp_path):
    """`phijax serve` (make_server on port 0, in a thread) over a tiny run directory whose
    model has a 256-token context and answers "7" or "8" forever."""
    from phijax.serve import make_server
    srv = make_server(seven_or_eight_run(tmp_path / "tiny"), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:   # shutdown() returns once serve_forever has
        srv.shutdown()
        srv.server_close()


@pytest.mark.slow
def test_demo_as_shipped_against_phijax_serve(tmp_path, tiny_server):
    """The demo runs as shipped against `phijax serve`, or says in one line why not, before
    any request: first the missing decontamination index, then (index built) its max_tokens
    against the served context. Made to fit, the rewrite prompt is still longer than the tiny
    model's context (every seed fails with that cause: exit 1); with a short prompt, the tiny
    model's answers are cut off at max_tokens, and every seed fails with that cause."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "seeds.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": f"Sum {i}."})
                                              + "\n" for i in range(2)))
    url = tiny_server.url
    run = ["run", ROOT / "configs" / "pipelines" / "demo.yaml", "input=seeds.jsonl",
           f"teacher.base_url={url}", "teacher.model=tiny", "--no-progress"]
    out = tools_cli(work, *run)
    assert (out.returncode, out.stderr.strip()) == (2, (
        "phijax-tools: error: stages[2].index: file data/evals/suite.npz does not exist; write "
        "it with `phijax-tools decontam build EVALS.jsonl ... --out data/evals/suite.npz`"))
    (work / "evals.jsonl").write_text(json.dumps({"text": "What is the sum of 2 and 3?"}) + "\n")
    built = tools_cli(work, "decontam", "build", "evals.jsonl", "--out", "data/evals/suite.npz")
    assert built.returncode == 0, built.stderr
    out = tools_cli(work, *run)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert re.fullmatch(rf"phijax-tools: error: stages\[0\]\.max_tokens: 2048 \(plus ~\d+ for "
                        rf"the prompt\) exceeds the context length 256 of model 'tiny' at "
                        rf"{re.escape(url)}", out.stderr.strip()), out.stderr
    assert tiny_server.stats["requests"] == 0 and not (work / "runs").exists()
    fit = [*run, "stages.0.max_tokens=8", "stages.1.max_tokens=8", "teacher.max_retries=1",
           "teacher.backoff_base_s=0.01"]
    out = tools_cli(work, *fit)
    assert (out.returncode, out.stderr.strip()) == (1, (
        "phijax-tools: error: 2 of 2 seeds failed (TeacherError: HTTP 400 "
        "context_length_exceeded 2); runs/pipelines/demo/failures.jsonl has each"))
    assert tiny_server.stats["requests"] == 2                 # a 400 is not retried
    (work / "short.txt").write_text("### Problem\n{text}")
    out = tools_cli(work, *fit, "stages.0.reasoning_file=short.txt", "output=runs/short")
    assert (out.returncode, out.stderr.strip()) == (1, (
        "phijax-tools: error: 2 of 2 seeds failed (TeacherError: finish_reason length 2); "
        "runs/short/failures.jsonl has each"))
    assert tiny_server.stats["requests"] == 2 + 4             # two tries a seed
    assert json.loads(out.stdout)["records"] == 0
