"""`phijax-experiment mixture` in miniature: a small toy world, the scripted teacher's two
pipelines, five token stores, the four arms as a phijax sweep (one seed, 3 steps, a tiny model),
`phijax eval` of each cell on both held-out sets, the table and the PNG. It checks the machinery,
not the result; then an arm asked for more tokens than a source gives fails before training,
naming the source."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiments.cli import main as experiment_main  # noqa: E402
from phijax.eval.questions import load_questions  # noqa: E402
from phijax.eval.tasks import load_simpleqa  # noqa: E402
from phijax.files import read_jsonl  # noqa: E402
from tools.decontam import Index  # noqa: E402

ARMS = ["web only", "synthetic only", "synthetic + web rewrites", "phi-4 mixture (Table 5)"]
TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=1",
        "train.batch_size=8", "data.seq_len=64", "train.log_every=1"]


def mixture(out: Path, steps: int, *extra) -> int:
    args = ["mixture", "--out", str(out), "--seeds", "1", "--steps", str(steps), "--people", "12",
            "--knowledge", "12", "--reasoning", "8", "--max-new-tokens", "6", *extra]
    for s in TINY:
        args += ["--set", s]
    return experiment_main(args)


@pytest.mark.slow
def test_mixture_arms_end_to_end(tmp_path, capsys, monkeypatch):
    # the cells' training processes: one CPU device each, compiled steps shared between them
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-cache"))
    out = tmp_path / "mx"
    assert mixture(out, 3) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = results["tables"]["mixture-arms"]
    assert [r["arm"] for r in rows] == ARMS and all(r["seeds"] == 1 for r in rows)
    data = out / "data"
    knowledge, reasoning = load_simpleqa(data / "knowledge.jsonl"), \
        load_questions(data / "reasoning.jsonl")
    choices = {name: [c for _, c in read_jsonl(data / f"{name}-choice.jsonl")]
               for name in ("knowledge", "reasoning")}
    for r in rows:  # every cell scored on every held-out item, by `phijax eval`'s graders
        assert r["knowledge"]["n"] == len(knowledge) and r["reasoning"]["n"] == len(reasoning)
        assert r["knowledge_choice"]["n"] == len(knowledge) == len(choices["knowledge"])
        assert r["reasoning_choice"]["n"] == len(reasoning) == len(choices["reasoning"])
        assert 0 <= r["knowledge"]["accuracy"] <= 1 and r["reasoning"]["stderr"] >= 0
    # the choice sets ask the same questions: four options, the right answer among them once
    for q, c in zip(knowledge, choices["knowledge"]):
        assert c["question"] == f"Question: {q.prompt}\nAnswer:" and len(set(c["choices"])) == 4
        assert c["choices"][c["answer"]] == f" {q.reference[0]}"
    for q, c in zip(reasoning, choices["reasoning"]):
        assert c["question"] == q["prompt"] and len(set(c["choices"])) == 4
        assert c["choices"][c["answer"]].endswith(f"\\boxed{{{q['answer']}}}")
    # how often each arm read each source, as `phijax data report` plans it
    assert results["epochs"]["mixture-arms"]["web only"]["web"] > 0
    assert set(results["epochs"]["mixture-arms"]["phi-4 mixture (Table 5)"]) == {
        "web", "web-rewrites", "synthetic", "code", "acquired"}
    assert "| synthetic only | 1 |" in printed and (out / "mixture-arms.png").stat().st_size > 0

    # the held-out sets share no n-grams with any training source
    index = Index.load(data / "heldout.npz")
    for source in ("web", "web-rewrites", "synthetic", "code", "acquired"):
        texts = [d["text"] for _, d in read_jsonl(data / f"{source}.jsonl")]
        assert texts and not any(index.check_many(texts)), source
    # the teacher's errors met the pipeline's filters
    synthetic = json.loads((out / "pipelines" / "synthetic" / "stats.json").read_text())["stages"]
    assert synthetic["difficulty"]["dropped_all_agree"] > 0 and synthetic["difficulty"]["kept"] > 0
    rewrites = [r for _, r in read_jsonl(next((out / "pipelines" / "rewrites").glob("records-*")))]
    assert any(s.get("rounds") for r in rewrites for s in r["provenance"]["stages"])

    # equal training tokens: every cell the same steps, batch and window
    cells = sorted((out / "sweeps" / "mixture-arms").glob("*/train.yaml"))
    import yaml
    configs = [yaml.safe_load(p.read_text()) for p in cells]
    assert len(configs) == 4
    assert {(c["train"]["steps"], c["train"]["batch_size"], c["data"]["seq_len"])
            for c in configs} == {(3, 8, 64)}

    # an arm that would repeat a source past max_epochs stops before training, naming it
    before = sorted(p.name for p in (out / "sweeps" / "mixture-arms").iterdir())
    assert mixture(out, 100000) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phijax-experiment: error: arm web=1,") and "source web has" in err
    assert "more than max_epochs 20" in err
    assert sorted(p.name for p in (out / "sweeps" / "mixture-arms").iterdir()) == before
