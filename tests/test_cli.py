"""The user-facing commands: `phijax info` and the README's main job."""
import re

import pytest

from conftest import ROOT, read_metrics, run_cli


def test_info_phi4_reports_14_66b_params():
    out = run_cli("info", ROOT / "configs" / "phi-4.yaml").stdout
    total = int(re.search(r"total\s+([\d,]+)", out).group(1).replace(",", ""))
    assert abs(total - 14.66e9) / 14.66e9 < 0.005
    for part in ("embedding", "attention", "mlp", "norms", "lm_head"):
        assert part in out


@pytest.mark.slow
def test_main_job_trains_tiny_model_and_loss_falls(tmp_path, cache_dir):
    run_dir = tmp_path / "tiny"
    out = run_cli("train", ROOT / "configs" / "tiny.yaml", f"run.dir={run_dir}",
                  f"data.cache_dir={cache_dir}")
    metrics = read_metrics(run_dir)
    first, last = metrics[0], metrics[-1]
    assert first["step"] == 1 and last["step"] == 300
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    assert last["eval_loss"] < 0.6 * first["loss"]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in last
    assert last["epochs/python-docs"] > 0 and last["epochs/python-stdlib"] > 0
    assert "realized epochs per source: python-docs" in out.stderr
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "300").is_dir()
    assert re.search(r"step 300/300 loss [\d.]+ eval [\d.]+ .* tok/s mfu [\d.]+% \| eta", out.stderr)
    # Rerunning a finished run is a no-op that says so.
    again = run_cli("train", ROOT / "configs" / "tiny.yaml", f"run.dir={run_dir}",
                    f"data.cache_dir={cache_dir}")
    assert "already complete at step 300" in again.stderr


@pytest.mark.slow
def test_train_on_chats_packs_whole_documents(tmp_path, cache_dir):
    import json
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n"
        for a in range(30) for b in range(10)))
    mixture = tmp_path / "sft.yaml"
    mixture.write_text(f"sources:\n  - {{name: chats, share: 0.8, corpus: [{chats}]}}\n"
                       f"  - {{name: docs, share: 0.2, corpus: [builtin:python-docs]}}\n")
    run_dir = tmp_path / "sft"
    out = run_cli("train", ROOT / "configs" / "tiny.yaml", f"run.dir={run_dir}",
                  f"data.cache_dir={cache_dir}", f"data.mixture={mixture}",
                  "data.packing=documents", "train.steps=30", "train.eval_every=30")
    metrics = read_metrics(run_dir)
    assert metrics[-1]["step"] == 30 and metrics[-1]["loss"] < 0.7 * metrics[0]["loss"]
    assert "documents are longer than data.seq_len + 1 and are cut" in out.stderr  # python-docs
    assert metrics[-1]["epochs/chats"] > 0


@pytest.mark.slow
def test_eval_runs_every_eval_every_steps_whatever_log_every(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_cli("train", ROOT / "configs" / "tiny.yaml", f"run.dir={run_dir}",
            f"data.cache_dir={cache_dir}", "train.steps=7", "train.log_every=3",
            "train.eval_every=2", "train.eval_batches=1", "checkpoint.every=1000")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4, 6, 7]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 6, 7]
    assert all("loss" in m and "tokens_per_s" in m for m in metrics)


def test_user_mistakes_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys):
    import argparse

    from phijax.cli import run_main
    from phijax.errors import DataError

    def command(error):
        p = argparse.ArgumentParser(prog="prog")
        p.set_defaults(fn=lambda args: (_ for _ in ()).throw(error))
        return p

    assert run_main(command(DataError("data.jsonl:3: no field 'text'")), []) == 2
    assert capsys.readouterr().err == "prog: error: data.jsonl:3: no field 'text'\n"
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    assert run_main(command(IsADirectoryError(21, "Is a directory", str(a_dir))), []) == 2
    assert capsys.readouterr().err == f"prog: error: {a_dir}: Is a directory\n"
    with pytest.raises(ValueError, match="a bug"):  # not a user's mistake: the traceback stays
        run_main(command(ValueError("a bug")), [])


def test_a_directory_given_as_the_tokenizer_is_one_line(tmp_path):
    out = run_cli("data", "tokenize", "builtin:python-docs", "--tokenizer", tmp_path,
                  "--out", tmp_path / "store", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("phijax: error: tokenizer ")
    assert "Traceback" not in out.stderr


def test_paths_and_ports_are_one_line_before_any_work(tmp_path, tiny_run):
    """A file where a run directory belongs (and a file in its path), a checkpoint that is a
    file, a port already in use: one line each, exit 2, no traceback, nothing tokenized."""
    import socket

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {("train", ROOT / "configs" / "tiny.yaml", f"run.dir={a_file}"):
             f"run.dir {a_file} is a file, not a directory",
             ("train", ROOT / "configs" / "tiny.yaml", f"run.dir={a_file / 'run'}"):
             f"{a_file} is a file, not a directory",
             ("sample", a_file, "--prompt", "x"): f"checkpoint {a_file} is a file",
             ("serve", a_file): f"run directory {a_file} is a file"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases[("serve", tiny_run, "--port", taken.getsockname()[1])] = \
            f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"
        for args, message in cases.items():
            out = run_cli(*args, check=False)
            assert out.returncode == 2, (args, out.stderr)
            assert "Traceback" not in out.stderr and "tokenize" not in out.stderr, out.stderr
            last = out.stderr.strip().splitlines()[-1]
            assert last.startswith("phijax: error: ") and message in last, (args, last)
