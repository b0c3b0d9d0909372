"""tools.decontam: 13-gram hits, 7-gram overlap ratio, whitelist, report, save/load."""
import json
import random

import pytest

from tools.cli import main as tools_main
from tools.decontam import Index, common_phrases, decontaminate, ngram_hashes, normalize

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")
MATH = ("Find the number of ordered pairs of positive integers whose product equals twelve and whose "
        "difference is a prime number greater than two.")
BOILER = "Answer the following multiple choice question and explain your reasoning step by step carefully"
WORDS = ("river stone garden window paper music cloud bridge market candle forest engine silver harbor "
         "lantern meadow orbit pepper quartz saddle thunder velvet whistle yonder anchor basket").split()


def filler(n, seed=0):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    d = tmp_path_factory.mktemp("evals")
    with open(d / "gsm8k.jsonl", "w") as f:
        f.write(json.dumps({"id": "gsm-1", "question": GSM}) + "\n")
        for i in range(12):  # boilerplate shared by many items -> auto-whitelisted
            f.write(json.dumps({"id": f"gsm-b{i}", "question": BOILER + " " + filler(30, f"eval{i}")}) + "\n")
    with open(d / "mixed.jsonl", "w") as f:  # benchmark named by a field
        f.write(json.dumps({"id": "m-1", "benchmark": "math", "question": MATH}) + "\n")
    return Index.build([d / "gsm8k.jsonl", d / "mixed.jsonl"], text_field="question",
                       whitelist=["in April and May and also in June of the same year, said the report"])


def test_normalize():
    assert normalize("Héllo,  WORLD!!\n ﬁne_tune — 1,000") == ["héllo", "world", "fine", "tune", "1", "000"]


def test_hashes_are_stable():
    h, rec = ngram_hashes(["a b c d e f g", "a b c d e f g h"], 7)
    assert list(rec) == [0, 1, 1] and h[0] == h[1] != h[2]


def test_planted_13gram_caught(index):
    planted = " ".join(normalize(GSM)[5:18])  # one 13-gram, punctuation and case lost
    text = filler(2000, 1) + " " + planted.upper() + "! " + filler(2000, 2)
    hit = index.check(text)
    assert hit is not None and (hit.benchmark, hit.item_id, hit.kind) == ("gsm8k", "gsm-1", "13gram")


def test_paraphrase_caught_by_7gram_rule(index):
    toks = normalize(GSM)  # 28 tokens; a change every <= 12 tokens kills every 13-gram
    para = toks[:10] + ["best"] + toks[10:21] + ["then"] + toks[21:]
    assert index.p13.best(*ngram_hashes([" ".join(para)], 13), 1, 0.0, 1)[0][0] == -1
    hit = index.check(filler(500, 3) + " " + " ".join(para) + " " + filler(500, 4))
    assert hit is not None and hit.kind == "7gram" and hit.item_id == "gsm-1" and hit.score >= 0.5


def test_clean_text_passes(index):
    same_topic = ("Natalia likes selling clips. In April she sold some to friends, and in May she sold "
                  "more clips than before. Counting how many clips were sold is an easy exercise.")
    assert index.check(same_topic) is None
    assert index.check(filler(3000, 5)) is None
    assert index.check("") is None


def test_whitelisted_13grams_do_not_trigger(index):
    assert index.check(BOILER + ". " + filler(100, 6)) is None  # in >K items: auto-whitelisted
    wl = Index.from_records([("b", "1", "Please note that all of the figures in this report are rounded to the "
                              "nearest whole number for clarity and the quantities are in grams")],
                            whitelist=["all of the figures in this report are rounded to the nearest whole number"])
    assert wl.check("Hello. All of the figures in this report are rounded to the nearest whole number.") is None
    assert wl.check("the quantities are in grams and figures in this report are rounded to the nearest "
                    "whole number for clarity").kind == "13gram"


def test_common_phrases_from_reference_corpus():
    phrase = "this article is licensed under the creative commons attribution share alike license version"
    corpus = [filler(40, i) + " " + phrase + " " + filler(40, 100 + i) for i in range(5)] + [filler(80, 9)]
    assert " ".join(normalize(phrase)[:13]) in common_phrases(corpus, min_docs=5)
    assert common_phrases(corpus, min_docs=6) == []


def test_decontaminate_reports_by_benchmark(index):
    records = [{"id": i, "text": filler(200, 10 + i)} for i in range(50)]
    records[3]["text"] += " " + GSM
    records[7]["text"] = "Q: " + MATH
    records[9]["text"] = "see: " + GSM.lower()
    removed = []
    clean, report = decontaminate(iter(records), index, "text", batch_size=8,
                                  on_hit=lambda r, h: removed.append(r["id"]))
    kept = [r["id"] for r in clean]
    assert kept == [i for i in range(50) if i not in (3, 7, 9)] and removed == [3, 7, 9]
    assert report.by_benchmark == {"gsm8k": 2, "math": 1}
    assert (report.seen, report.kept, report.removed) == (50, 47, 3)


def test_save_load_round_trip(index, tmp_path):
    path = tmp_path / "suite.idx"
    index.save(path)
    loaded = Index.load(path)
    toks = normalize(GSM)
    texts = [GSM, MATH, filler(300, 20), " ".join(toks[:10] + ["x"] + toks[10:21] + ["y"] + toks[21:]),
             BOILER + " " + filler(20, 21)]
    assert loaded.check_many(texts) == index.check_many(texts)
    assert loaded.info == index.info


def test_cli_build_and_filter(index, tmp_path, capsys):
    evals = tmp_path / "gsm8k.jsonl"
    evals.write_text(json.dumps({"id": "gsm-1", "question": GSM, "answer": "72"}) + "\n")
    suite = tmp_path / "suite.npz"
    assert tools_main(["decontam", "build", str(evals), "--out", str(suite),
                       "--text-field", "question"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 1
    records = [{"id": i, "text": filler(60, 30 + i)} for i in range(5)]
    records[2]["text"] += " café " + GSM
    inp = tmp_path / "seeds.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    out, removed = tmp_path / "clean.jsonl", tmp_path / "removed.jsonl"
    assert tools_main(["decontam", "filter", str(inp), "--index", str(suite), "--output", str(out),
                       "--removed", str(removed)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["seen"], report["kept"], report["removed"]) == (5, 4, 1)
    assert report["by_benchmark"] == {"gsm8k": 1} and report["examples"][0]["item_id"] == "gsm-1"
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [0, 1, 3, 4]
    (hit,) = [json.loads(line) for line in removed.read_text().splitlines()]
    assert hit["id"] == 2 and hit["text"] == records[2]["text"]
    assert hit["decontam"]["benchmark"] == "gsm8k" and hit["decontam"]["kind"] == "13gram"


def test_cli_names_the_file_and_line_of_a_bad_eval_record(tmp_path, capsys):
    evals = tmp_path / "evals.jsonl"
    evals.write_text(json.dumps({"question": GSM}) + "\n" + json.dumps({"answer": 3}) + "\n")
    assert tools_main(["decontam", "build", str(evals), "--out", str(tmp_path / "i.npz"),
                       "--text-field", "question"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"phijax-tools: error: {evals}:2: none of the fields question"
