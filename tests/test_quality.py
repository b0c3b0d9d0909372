"""tools.quality: teacher-reply parsing, the hashed-n-gram classifier, selection, agreement."""
import json
import random

import numpy as np
import pytest

from tools.cli import main as tools_main
from tools.quality import (SCORE_PROMPT, QualityClassifier, QualityConfig, agreement, featurize,
                           keep, parse_score, print_agreement)

GOOD = ("A {n} is defined as a function that maps each input to exactly one output.",
        "For example, if x = {k} then the result equals {k2} because each step doubles it.",
        "This means that the {n} converges whenever the series is bounded.",
        "Therefore, we can prove that every finite {n} has a unique solution.",
        "def {n}(x):\n    \"\"\"Return the square of x.\"\"\"\n    return x * x",
        "Step {k}: compute the {n} first, then check the result against the definition.")
BAD = ("Click here to get the best {n} deals today!!! Free shipping.",
       "Buy now and save {k}% on every {n}. Limited time offer.",
       "Subscribe | Home | About | Contact | Login | Cart",
       "Copyright 20{k} All rights reserved. Cookie policy. Privacy policy.",
       "Top {k} {n} secrets you won't believe. Sponsored content.")
NEUTRAL = ("The {n} was mentioned in {k} posts this year.", "Related: {n} and {k} other topics.")
NOUNS = ("matrix", "theorem", "graph", "vector", "integral", "algorithm", "protein", "circuit")


def corpus(n=2000, seed=0, flip=0.05):
    """Educational docs (mostly explanations/definitions/code) score 3-5, spammy/boilerplate
    docs 0-2; every doc mixes in the other kind and neutral filler; `flip` of labels flipped."""
    rng = random.Random(seed)
    texts, scores = [], []
    for _ in range(n):
        good = rng.random() < 0.5
        q = rng.uniform(0.65, 1.0) if good else rng.uniform(0.0, 0.35)
        sents = []
        for _ in range(rng.randint(6, 14)):
            pool = NEUTRAL if rng.random() < 0.3 else (GOOD if rng.random() < q else BAD)
            sents.append(rng.choice(pool).format(n=rng.choice(NOUNS), k=rng.randint(2, 99),
                                                 k2=rng.randint(2, 999)))
        score = rng.randint(3, 5) if good else rng.randint(0, 2)
        if rng.random() < flip:
            score = 5 - score
        texts.append(" ".join(sents))
        scores.append(score)
    return texts, np.array(scores)


@pytest.fixture(scope="module")
def trained():
    texts, scores = corpus(2000)
    clf = QualityClassifier.train(texts[:1600], scores[:1600], seed=0)
    return clf, texts[1600:], scores[1600:]


@pytest.mark.parametrize("reply,want", [
    ("The text explains recursion clearly.\nScore: 4", 4),
    ("score:5", 5), ("**Score:** 3", 3), ("Score = 2", 2), ("Score: 4/5", 4), ("Score: 4.0", 4),
    ("Score: 1\n... on reflection ...\nScore: 3", 3),   # the last one counts
    ("Score: 7", None), ("Score: 2.5", None), ("I would give it a four.", None), ("", None),
    (None, None),
])
def test_parse_score(reply, want):
    assert parse_score(reply) == want


def test_prompt_template_has_text_placeholder_and_reply_format():
    assert SCORE_PROMPT.count("{text}") == 1 and "Score: N" in SCORE_PROMPT
    from tools.pipeline import render_template  # the teacher pipeline renders it as is
    assert "hello world" in render_template(SCORE_PROMPT, {"id": "x", "text": "hello world"})


def test_heldout_agreement_well_above_chance(trained, capsys):
    clf, texts, scores = trained
    stats = agreement(clf.score(texts), scores)
    with capsys.disabled():
        print()
        print_agreement(stats, "test_quality held-out")
    assert stats["n"] == 400
    assert stats["accuracy"] >= 0.8 and stats["kappa"] >= 0.6
    base_rate = max((scores >= 3).mean(), (scores < 3).mean())
    assert stats["accuracy"] > base_rate + 0.2


def test_scores_are_probabilities_and_match_training_features(trained):
    clf, texts, _ = trained
    s = clf.score(texts[:50])
    assert s.shape == (50,) and np.all((s > 0) & (s < 1))
    logits = featurize(texts[:50]) @ clf.coef + clf.intercept   # the training-time features
    np.testing.assert_allclose(np.log(s / (1 - s)), logits, rtol=1e-9, atol=1e-9)
    small = QualityClassifier(QualityConfig(batch_size=7), clf.coef, clf.intercept)
    np.testing.assert_allclose(small.score(texts[:50]), s, rtol=1e-12)   # batching is invisible
    assert clf.score([]).shape == (0,) and np.isfinite(clf.score(["", "!!"])).all()


def test_unigram_columns_match_sklearn_hashing_vectorizer():
    from sklearn.feature_extraction.text import HashingVectorizer
    texts, _ = corpus(50, seed=3)
    texts += ["Ünïcode wörds and x y single chars", "CamelCase snake_case 3.14 don't"]
    hv = HashingVectorizer(n_features=2**20, alternate_sign=False, norm=None)
    ref = hv.transform(texts)
    ours = featurize(texts, bigrams=False, normalise=False)
    assert abs(ref - ours).max() == 0


def test_training_is_deterministic():
    texts, scores = corpus(300, seed=1)
    a = QualityClassifier.train(texts, scores, seed=0)
    b = QualityClassifier.train(texts, scores, seed=0)
    np.testing.assert_array_equal(a.coef, b.coef)


def test_save_load_round_trip(trained, tmp_path):
    clf, texts, _ = trained
    path = clf.save(tmp_path / "quality.npz")
    with np.load(path, allow_pickle=False) as z:     # plain arrays, no pickled objects
        assert set(z.files) == {"indices", "values", "intercept", "config"}
    back = QualityClassifier.load(path)
    assert back.config == clf.config
    np.testing.assert_array_equal(back.score(texts), clf.score(texts))


def test_train_rejects_bad_labels():
    texts, _ = corpus(10)
    with pytest.raises(ValueError, match="one class"):
        QualityClassifier.train(texts, [4] * 10)
    with pytest.raises(ValueError, match="0-5"):
        QualityClassifier.train(texts, [9, 0] * 5)
    with pytest.raises(ValueError, match="labels"):
        QualityClassifier.train(texts, [0, 5])


def test_keep_by_threshold_and_percentile():
    s = np.array([0.1, 0.9, 0.5, 0.3, 0.7])
    assert keep(s).tolist() == [False, True, True, False, True]          # default 0.5
    assert keep(s, threshold=0.6).tolist() == [False, True, False, False, True]
    assert keep(s, percentile=60).tolist() == [False, True, False, False, True]  # top 40%
    assert keep(s, percentile=0).all() and keep(s, percentile=100).sum() == 1
    big = np.random.default_rng(0).random(10_000)
    assert abs(keep(big, percentile=90).mean() - 0.10) < 0.001
    with pytest.raises(ValueError):
        keep(s, threshold=0.5, percentile=50)
    with pytest.raises(ValueError):
        keep(s, percentile=150)


def test_agreement_accuracy_and_kappa():
    from sklearn.metrics import cohen_kappa_score
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 500)
    pred = np.clip((labels >= 3) * 0.8 + rng.normal(0, 0.3, 500), 0, 1)
    st = agreement(pred, labels)
    p, y = pred >= 0.5, labels >= 3
    assert st["accuracy"] == pytest.approx((p == y).mean())
    assert st["kappa"] == pytest.approx(cohen_kappa_score(p, y))
    assert agreement(y, labels)["accuracy"] == 1.0 and agreement(y, y)["kappa"] == 1.0
    assert agreement(np.full(4, 0.9), np.array([5, 5, 5, 5]))["kappa"] == 1.0


def test_cli_train_eval_score(tmp_path, capsys):
    texts, scores = corpus(600, seed=2)
    data = tmp_path / "labelled.jsonl"
    with open(data, "w") as f:
        for i, (t, s) in enumerate(zip(texts, scores)):
            # raw teacher replies are parsed; an unparsable one is skipped
            label = f"Reasoning...\nScore: {s}" if i % 2 else int(s)
            f.write(json.dumps({"text": t, "score": "no score" if i == 0 else label}) + "\n")
    model = tmp_path / "m.npz"
    assert tools_main(["quality", "train", "--data", str(data), "--out", str(model),
                       "--holdout", "0.2"]) == 0
    out = capsys.readouterr()
    assert "held-out: n=120 accuracy=" in out.out and "skipped 1" in out.err
    assert tools_main(["quality", "eval", "--model", str(model), "--data", str(data)]) == 0
    acc = float(capsys.readouterr().out.split("accuracy=")[1].split()[0])
    assert acc >= 0.8
    scored = tmp_path / "scored.jsonl"
    assert tools_main(["quality", "score", "--model", str(model), "--input", str(data),
                       "--output", str(scored)]) == 0
    rows = [json.loads(l) for l in scored.read_text().splitlines()]
    assert len(rows) == 600 and all(0 < r["quality"] < 1 for r in rows)


@pytest.mark.parametrize("line, why", [
    ('{"score": 3}', "no field 'text'"),
    ('{"text": "a document"}', "no field 'score'"),
    ('{"text": 7, "score": 3}', "field 'text' is not a string"),
    ('{"text": "a document", "score": 3', "invalid JSON"),
])
def test_cli_names_the_file_and_line_of_a_bad_record(tmp_path, capsys, line, why):
    data = tmp_path / "labelled.jsonl"
    data.write_text(json.dumps({"text": "fine", "score": 4}) + "\n" + line + "\n")
    model = tmp_path / "m.npz"
    assert tools_main(["quality", "train", "--data", str(data), "--out", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"phijax-tools: error: {data}:2: ") and why in err, err
    assert len(err.strip().splitlines()) == 1 and not model.exists()
