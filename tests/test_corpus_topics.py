"""`phijax-tools topics annotate | train | balance` end to end with a loopback OpenAI-compatible
teacher that knows each document's topic: labels through the cached pipeline, a classifier that
learns them, a resampler that lifts the targeted topics to their shares (reported before and
after), and one-line errors for a bad config or a missing file."""
import json
import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_server import start_server  # noqa: E402

from tools.cli import main as tools_main  # noqa: E402
from tools.corpus.balance import plan_counts  # noqa: E402
from tools.corpus.steps import read_docs  # noqa: E402
from tools.corpus.topics import parse_topic  # noqa: E402

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "corpus" / "topics.yaml")
TOPICS = ["science", "programming", "history", "travel", "arts"]
WORDS = {
    "science": "atom molecule energy experiment physics chemistry electron laboratory cell "
               "hypothesis particle measurement gravity",
    "programming": "function compiler variable python loop library debug code software "
                   "interface runtime algorithm",
    "history": "empire century king war ancient dynasty revolution medieval treaty battle "
               "monarch archive",
    "travel": "hotel flight beach passport itinerary tourist island luggage destination "
              "journey resort visa",
    "arts": "painting sculpture gallery canvas museum artist portrait exhibition brush "
            "composer poetry theatre",
}
COMMON = "the of and a to in is that it was for on with as by this from at which".split()
SIZES = {"science": 40, "programming": 30, "history": 15, "travel": 10, "arts": 5}


def document(topic: str, i: int) -> str:
    rng = random.Random(f"{topic}-{i}")
    words = WORDS[topic].split()
    return " ".join(rng.choice(words) if rng.random() < 0.4 else rng.choice(COMMON)
                    for _ in range(60)).capitalize() + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("topics")
    docs = [{"text": document(t, i), "url": f"https://e.com/{t}/{i}", "true": t}
            for t, n in SIZES.items() for i in range(n)]
    random.Random(0).shuffle(docs)
    (root / "in").mkdir()
    (root / "in" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    truth = {d["text"]: d["true"] for d in docs}

    def teacher(messages, n, i):
        prompt = messages[-1]["content"]
        assert "- science\n- programming\n- history\n- travel\n- arts" in prompt
        text = re.search(r"<<<\n(.*)\n>>>", prompt, re.S).group(1)
        if text == docs[0]["text"]:
            return "I cannot tell."
        return f"It is about {truth[text]}.\n**Topic:** {truth[text].capitalize()}"

    server = start_server(responder=teacher)
    overrides = [f"inputs=[{root / 'in'}]", f"output={root / 'out'}", f"topics={TOPICS}",
                 "targets={history: 0.25, travel: 0.2, arts: 0.1}", "annotate.documents=90",
                 f"teacher.base_url={server.url}", "teacher.model=echo", "train.holdout=0.1",
                 "train.n_features=4096"]
    yield root, overrides, server, docs
    server.stop()


def topics(*args, overrides=()):
    return tools_main(["topics", *args, CONFIG, *overrides])


def test_annotate_train_balance_reach_the_target_shares(corpus, capsys):
    root, overrides, server, docs = corpus
    assert topics("annotate", "--no-progress", overrides=overrides) == 0
    annotated = json.loads(capsys.readouterr().out)
    assert server.stats.snapshot()["requests"] == 90
    assert annotated["sampled"] == 90 and annotated["unlabelled"] <= 1
    labels = [json.loads(line) for line in (root / "out" / "labels.jsonl").open()]
    truth = {d["text"]: d["true"] for d in docs}
    assert all(truth[r["text"]] == r["topic"] for r in labels)  # Capitalised names parsed
    assert sum(annotated["topics"].values()) == len(labels)

    assert topics("annotate", "--no-progress", overrides=overrides) == 0  # resumed: no calls
    assert server.stats.snapshot()["requests"] == 90
    assert json.loads(capsys.readouterr().out)["labelled"] == len(labels)

    assert topics("train", overrides=overrides) == 0
    out, err = capsys.readouterr()
    trained = json.loads(out)
    assert trained["held_out"] == round(len(labels) * 0.1) and trained["accuracy"] >= 0.9
    assert "held-out: n=" in err

    assert topics("balance", overrides=overrides) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report == json.loads((root / "out" / "balance.json").read_text())
    before, after = report["before"], report["after"]
    assert {t: before[t]["documents"] for t in TOPICS} == SIZES  # the classifier is right
    total = report["documents_after"]
    for topic, share in {"history": 0.25, "travel": 0.2, "arts": 0.1}.items():
        assert abs(after[topic]["share"] - share) <= 0.5 / total + 1e-6
    assert after["science"]["documents"] == 40 and after["programming"]["documents"] == 30
    assert report["short_of_target"] == []
    assert "docs before" in err  # arts: 5 documents (5%) before, 16 (10.3%) after, target 10%
    assert re.search(r"^arts\s+5\s+0\.050\s+16\s+0\.103\s+0\.100", err, re.M)

    written = list(read_docs(root / "out" / "balanced" / "part-000000.jsonl.zst"))
    assert len(written) == total
    assert {t: sum(d["topic"] == t for d in written) for t in TOPICS} == \
        {t: after[t]["documents"] for t in TOPICS}
    assert all(d["topic"] == d["true"] and d["url"].startswith("https://") for d in written)
    copies = {}
    for d in written:
        copies[d["url"]] = copies.get(d["url"], 0) + 1
    assert len(copies) == len(docs) and max(copies.values()) <= 4

    first = (root / "out" / "balanced" / "part-000000.jsonl.zst").read_bytes()
    assert topics("balance", overrides=overrides) == 0  # seeded: the same output again
    assert (root / "out" / "balanced" / "part-000000.jsonl.zst").read_bytes() == first
    capsys.readouterr()

    capped = overrides + ["targets={arts: 0.3}", "balance.max_repeats=2"]
    assert topics("balance", overrides=capped) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["after"]["arts"]["documents"] == 10 and report["short_of_target"] == ["arts"]


def test_plan_thins_out_a_topic_above_its_target_and_caps_repeats():
    assert plan_counts({"a": 50, "b": 50}, {"b": 0.2}, 4) == {"a": 50, "b": 12}
    assert plan_counts({"a": 90, "b": 5, "c": 5}, {"b": 0.1, "c": 0.3}, 4) == \
        {"a": 90, "b": 12, "c": 20}  # c capped at 4 x 5; b: 10% of 90 + 20 + 12
    assert plan_counts({"a": 10, "b": 0}, {"b": 0.5}, 4) == {"a": 10, "b": 0}


@pytest.mark.parametrize("reply, topic", [
    ("Mostly about wars.\nTopic: History", "history"), ("**Topic:** travel.", "travel"),
    ("Topic: arts\nTopic = science", "science"), ("Topic: cooking", None), ("no idea", None)])
def test_parse_topic(reply, topic):
    assert parse_topic(reply, TOPICS) == topic


@pytest.mark.parametrize("args, message", [
    (["balance", "targets={poetry: 0.1}"], "targets.poetry: not one of topics"),
    (["balance", "targets={arts: 1.5}"], "targets.arts: a share in [0, 1), got 1.5"),
    (["balance", "targets={arts: 0.6, travel: 0.5}"], "targets: the shares add up to 1.1"),
    (["train", "output=/nonexistent/topics"], "/nonexistent/topics/labels.jsonl does not exist"),
    (["balance", "inputs=[/nonexistent/in]"], "inputs: /nonexistent/in does not exist"),
    (["annotate", "teacher=null"], "teacher: required to annotate"),
    (["train", "topics=[arts, Arts]"], "topics: 'Arts' is listed twice"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    base = [f"inputs=[{tmp_path / 'in.jsonl'}]", f"output={tmp_path}", f"topics={TOPICS}",
            "targets={arts: 0.1}"]
    assert tools_main(["topics", args[0], CONFIG, *base, *args[1:]]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("phijax-tools: error: ") and message in line


def test_the_topic_label_stage_checks_its_topics(tmp_path):
    from tools.pipeline import PipelineError, load_pipeline
    (tmp_path / "seeds.jsonl").write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    raw = {"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
           "input": str(tmp_path / "seeds.jsonl"), "output": str(tmp_path / "run"),
           "stages": [{"name": "t", "type": "topic_label", "topics": []}]}
    with pytest.raises(PipelineError, match=r"stages\[0\]\.topics: expected a non-empty list"):
        load_pipeline(raw=raw)
    raw["stages"][0]["topics"] = TOPICS
    assert load_pipeline(raw=raw).stages[0].adds() == ["topic"]


def test_a_smaller_sample_labels_only_its_documents(corpus, capsys):
    root, overrides, server, docs = corpus
    assert topics("annotate", "--no-progress", overrides=overrides + [
        "annotate.documents=30", "seed=5"]) == 0
    annotated = json.loads(capsys.readouterr().out)
    labels = [json.loads(line) for line in (root / "out" / "labels.jsonl").open()]
    seeds = [json.loads(line) for line in (root / "out" / "annotate" / "seeds.jsonl").open()]
    assert annotated["sampled"] == len(seeds) == 30
    assert len(labels) == annotated["labelled"] >= 29
    assert {r["id"] for r in labels} <= {s["id"] for s in seeds}
