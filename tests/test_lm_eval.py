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

from conftest import ROOT, free_port

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


def _lm_eval(model: str, model_args: str, tasks: str, out) -> dict:
    """`lm-eval run` offline on the tasks of tests/data/lm_eval, samples logged under `out`:
    its results."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(out / "datasets"))
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
           "--tasks", tasks, "--include_path", str(TASKS), "--output_path", str(out),
           "--log_samples", "--batch_size", "1", "--device", "cpu"]
    run = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    (results_path,) = out.rglob("results_*.json")
    return json.loads(results_path.read_text())["results"]


@pytest.fixture(scope="module")
def through_serve(served, tmp_path_factory):
    """lm-eval's local-completions against phijax serve: (results, output folder)."""
    out = tmp_path_factory.mktemp("lm-eval-serve")
    model_args = (f"model=tiny,base_url={served},tokenizer_backend=remote,"
                  f"tokenized_requests=True,max_length=1024,num_concurrent=4,max_retries=1")
    return _lm_eval("local-completions", model_args,
                    "phijax_choice,phijax_generate,phijax_greedy", out), out


def _loglikelihoods(out) -> list[float]:
    return [float(resp[0][0]) for s in _samples(out, "phijax_choice") for resp in s["resps"]]


@pytest.mark.slow
def test_lm_eval_local_completions_scores_what_phijax_scores(through_serve, tiny_run):
    from phijax.eval.loglik import LikelihoodScorer
    from phijax.sampling import Request, load_sampler
    from phijax.weights import load_checkpoint

    results, out = through_serve
    cfg, params, tok, _ = load_checkpoint(tiny_run)
    # Log-likelihoods: lm-eval's, through the server's echo, against phijax's eval scorer on
    # the same split of the whole text into context and continuation.
    choice = _samples(out, "phijax_choice")
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
    gen = _samples(out, "phijax_generate")
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


@pytest.mark.slow
def test_lm_evals_hf_backend_on_the_exported_checkpoint_agrees(through_serve, tiny_run,
                                                              tmp_path):
    """A peer no one here wrote: the checkpoint exported with `convert to-hf` and scored by
    lm-eval's `hf` backend (transformers, PyTorch) gives the same per-item log-likelihoods
    (1e-3) and the same greedy completions as phijax behind lm-eval."""
    from conftest import run_cli

    _, served_out = through_serve
    run_cli("convert", "to-hf", tiny_run, tmp_path / "hf")
    _lm_eval("hf", f"pretrained={tmp_path / 'hf'},dtype=float32",
             "phijax_choice,phijax_greedy", tmp_path / "out")
    ours, theirs = _loglikelihoods(served_out), _loglikelihoods(tmp_path / "out")
    assert len(ours) == len(theirs) == 24
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3)
    greedy = [s["resps"][0][0] for s in _samples(served_out, "phijax_greedy")]
    assert greedy == [s["resps"][0][0] for s in _samples(tmp_path / "out", "phijax_greedy")]
    assert sum(len(t) for t in greedy) > 20, greedy


@pytest.mark.slow
def test_phijax_eval_lm_eval_serves_the_checkpoint_and_reports_lm_evals_scores(tiny_run,
                                                                              tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    out = subprocess.run([sys.executable, "-m", "phijax", "eval", str(tiny_run), "--lm-eval",
                          "phijax_choice", "--lm-eval-include", str(TASKS), "--out",
                          str(tmp_path / "out"), "--limit", "4"],
                         cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    (saved,) = (tmp_path / "out" / "lm_eval").rglob("results_*.json")
    assert json.loads(saved.read_text())["results"] == results
    assert 0 <= results["phijax_choice"]["acc,none"] <= 1
    assert "phijax_choice" in out.stdout and "acc" in out.stdout
    assert len(_samples(tmp_path / "out" / "lm_eval", "phijax_choice")) == 4


def test_lm_eval_needs_its_include_folder_to_exist(tiny_run, tmp_path):
    from conftest import run_cli

    out = run_cli("eval", tiny_run, "--lm-eval", "x", "--lm-eval-include", tmp_path / "no",
                  check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == \
        f"phijax: error: --lm-eval-include {tmp_path / 'no'} is not a directory of task YAMLs"


@pytest.mark.slow
@pytest.mark.parametrize("object_store", ["s3"], indirect=True)
def test_phijax_eval_lm_eval_writes_its_outputs_to_a_bucket(tiny_run, object_store, tmp_path):
    from phijax import paths
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    out = subprocess.run([sys.executable, "-m", "phijax", "eval", str(tiny_run), "--lm-eval",
                          "phijax_choice", "--lm-eval-include", str(TASKS), "--out",
                          f"{object_store}/eval", "--limit", "2"],
                         cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    fs, root = paths.filesystem(f"{object_store}/eval/lm_eval")
    files = fs.find(root)
    (saved,) = [f for f in files if f.rsplit("/", 1)[-1].startswith("results_")]
    assert json.loads(fs.cat_file(saved))["results"] == results
    assert any("samples_phijax_choice" in f for f in files)
