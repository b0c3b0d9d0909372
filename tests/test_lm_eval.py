"""lm-evaluation-harness's `local-completions` model against `phijax serve`, with no network:
the scores it reports are phijax's own scoring of the same items."""
import json
import math
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT
from test_multiprocess import free_port

TASKS = ROOT / "tests" / "data" / "lm_eval"
pytest.importorskip("lm_eval", reason="lm-eval[api] comes with the dev extra")


@pytest.fixture(scope="module")
def served(tiny_run):
    """`phijax serve` on the tiny run in its own process: its /v1/completions URL."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "phijax", "serve", str(tiny_run), "--port",
                             str(port), "--model-name", "tiny"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"phijax serve did not start:\n{proc.communicate()[0]}")
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1/completions"
    proc.terminate()
    assert proc.wait(timeout=60) == 0, proc.communicate()[0]


def _samples(out_dir, task: str) -> list[dict]:
    """lm-eval's logged samples of `task`, in document order."""
    (path,) = out_dir.rglob(f"samples_{task}_*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["doc_id"])


@pytest.mark.slow
def test_lm_eval_local_completions_scores_what_phijax_scores(served, tiny_run, tmp_path):
    from phijax.eval.loglik import LikelihoodScorer
    from phijax.sampling import Request, load_sampler
    from phijax.weights import load_checkpoint

    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    model_args = (f"model=tiny,base_url={served},tokenizer_backend=remote,"
                  f"tokenized_requests=True,max_length=1024,num_concurrent=4,max_retries=1")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
           "--model_args", model_args, "--tasks", "phijax_choice,phijax_generate",
           "--include_path", str(TASKS), "--output_path", str(tmp_path / "out"),
           "--log_samples", "--batch_size", "1"]
    run = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    (results_path,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_path.read_text())["results"]

    cfg, params, tok, _ = load_checkpoint(tiny_run)
    # Log-likelihoods: lm-eval's, through the server's echo, against phijax's eval scorer on
    # the same split of the whole text into context and continuation.
    choice = _samples(tmp_path / "out", "phijax_choice")
    assert len(choice) == 6
    pairs, theirs = [], []
    for sample in choice:
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            ctx = tok.encode([context])[0]
            whole = tok.encode([context + continuation])[0]
            pairs.append((ctx, whole[len(ctx):]))
            theirs.append(float(resp[0][0]))
    ours = LikelihoodScorer(cfg.model, params).score(pairs)
    assert len(ours) == 24
    for a, b in zip(theirs, ours):
        assert a == pytest.approx(b, abs=1e-4)
    accuracy = sum(max(range(4), key=lambda k: ours[4 * i + k]) == s["doc"]["answer"]
                   for i, s in enumerate(choice)) / len(choice)
    assert math.isclose(results["phijax_choice"]["acc,none"], accuracy)

    # Generation: the server's text is phijax's sample with lm-eval's seed, cut at the newline.
    gen = _samples(tmp_path / "out", "phijax_generate")
    assert len(gen) == 6
    sampler, _ = load_sampler(tiny_run)
    prompts = [tok.encode([s["arguments"]["gen_args_0"]["arg_0"]])[0] for s in gen]
    outs = sampler.generate([Request(p, max_new_tokens=16, temperature=1.0, seed=1234,
                                     stop_ids=(tok.eos_id,)) for p in prompts])
    texts = [tok.decode(o[0].tokens[:-1] if o[0].finish_reason == "stop" else o[0].tokens)
             .split("\n")[0] for o in outs]
    assert sum(len(t) for t in texts) > 20, texts  # some text before the newlines
    assert [s["filtered_resps"][0] for s in gen] == texts
    exact = sum(t == s["target"] for t, s in zip(texts, gen)) / len(gen)
    assert math.isclose(results["phijax_generate"]["exact_match,none"], exact)
