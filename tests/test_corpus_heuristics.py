"""Heuristic filters: a good page passes (C4 trims its policy and citation lines), and each
check removes the page it is meant for, named `filter: check`."""
import base64
import itertools
import random

import pytest

from tools.corpus.heuristics import Heuristics, HeuristicsConfig

PROSE = [
    "The river runs through the old town and past the mill that was built in the last century.",
    "Farmers bring their vegetables to the market on Saturday mornings, and the square is busy "
    "with buyers from the villages nearby.",
    "In winter the water freezes near the banks, so children skate there while their parents "
    "watch from the bridge.",
    "A small museum keeps the tools of the millers, with drawings that show how the wheel "
    "turned the heavy stones.",
    "Visitors often ask why the town never grew larger; the answer has to do with the hills "
    "that surround it on three sides.",
    "Trains arrived late, in 1911, and by then most trade had moved to the port further south.",
    "Today the town is known for its bread, its quiet streets and a festival of music each "
    "summer.",
]
GOOD = "\n\n".join(PROSE)
LONG = ["particular", "understand", "everything", "background", "government", "themselves",
        "individual", "technology", "management", "experience"]  # lines of 3 are > 30 chars


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = [w.strip(".,;").lower() for w in GOOD.split()]
    return " ".join(rng.choice(vocab) for _ in range(n))


def check(text: str, **sections):
    cfg = HeuristicsConfig()
    for name, values in sections.items():
        for key, value in values.items():
            setattr(cfg if name == "heuristics" else getattr(cfg, name), key, value)
    return Heuristics(cfg).check(text)


def test_a_good_page_passes_and_c4_trims_its_lines():
    page = GOOD.replace("century.", "century.[1]") + \
        "\n\nThis site uses cookies to improve your experience.\nMenu\n"
    text, reason = check(page)
    assert reason is None
    assert text == GOOD  # the cookie line, the one-word line and the citation mark are gone


rng = random.Random(0)
BAD = {
    "corruption: compression ratio too high":
        base64.b64encode(bytes(rng.randrange(256) for _ in range(3000))).decode(),
    "corruption: compression ratio too low": "buy cheap watches today\n" * 200,
    "corruption: bad characters": GOOD.replace("e", "\ufffd", 30),
    "corruption: mojibake": GOOD.replace("é", "Ã©").replace(" the ", " thÃ© ", 4),
    "gopher_repetition: duplicate paragraphs": "\n\n".join(PROSE[:3] + [PROSE[0]] * 3),
    "gopher_repetition: duplicate lines": "\n".join(PROSE + ["Subscribe to our news."] * 5),
    "gopher_repetition: top 2-gram": GOOD + " " + "of the " * 60,
    "gopher_repetition: duplicate 5-grams": GOOD + " " + " ".join(
        f"{PROSE[1]} {i}" for i in range(3)),
    "gopher_quality: word count": "Too short to be a page, though it is a fine sentence.",
    "gopher_quality: mean word length": GOOD + " " + " ".join(
        chr(97 + i % 26) + chr(97 + i // 26) for i in range(300)),
    "gopher_quality: symbol ratio": GOOD.replace(" ", " # ", 20),
    "gopher_quality: bullet lines": "\n".join(f"- {p}" for p in PROSE),
    "gopher_quality: ellipsis lines": "\n".join(p[:-1] + "..." for p in PROSE),
    "gopher_quality: alphabetic words": GOOD + " " + " ".join(
        str(rng.randrange(10**6)) for _ in range(60)),
    "gopher_quality: stop words": words(80).replace(" the", " ").replace(" and", " ")
    .replace(" of", " ").replace(" to", " ").replace(" that", " ").replace(" with", " "),
    "c4: lorem ipsum": GOOD + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "c4: too few sentences": words(120, 1),
    "fineweb: line punctuation": "\n".join(p + " Then more follows" for p in PROSE),
    "fineweb: duplicate line characters": GOOD + "\n\nSee the notes below for more." * 2,
    "fineweb: list-like": "\n\n".join(PROSE[:3] + [
        f"{a} {b} {c}." for a, b, c in itertools.islice(itertools.permutations(LONG, 3), 40)]),
}


@pytest.mark.parametrize("reason", list(BAD))
def test_each_check_removes_its_page(reason):
    assert check(BAD[reason])[1] == reason


def test_switches_and_thresholds_come_from_the_config():
    code_page = GOOD + "\n\n```\nint main() { return 0; }\n```"
    assert check(code_page)[1] is None  # code in fences survives C4's line rules
    assert check(code_page, c4={"remove_curly_bracket": True})[1] == "c4: curly bracket"
    short = "Too short to be a page, though it is a fine sentence."
    assert check(short, gopher_quality={"min_words": 5}, c4={"min_sentences": 1},
                 fineweb={"max_short_line_ratio": 2.0})[1] is None
    assert check(BAD["c4: lorem ipsum"], c4={"enabled": False})[1] is None


CODE_PAGE = GOOD + """

The mill's ledger is kept in a small program; this function totals a day's sacks:

```
def total_weight(sacks: list[dict]) -> float:
    \"\"\"Sum the weight of every sack, skipping the empty ones.\"\"\"
    total = 0.0
    for sack in sacks:
        if sack.get("empty"):
            continue
        total += float(sack["kg"])  # kilograms, as the scale prints them
    return round(total, 2)

print(total_weight([{"kg": 12.5}, {"kg": 40}, {"empty": True}]))
```

It prints 52.5, the weight of the two full sacks."""
RUSSIAN = ("Река протекает через старый город и мимо мельницы, построенной в прошлом веке. "
           "Крестьяне привозят овощи на рынок по субботам, и площадь полна покупателей. ") * 3
JUNK = {  # each passes the zlib, bad-character and mojibake checks
    "shuffled characters": "".join(random.Random(1).sample(GOOD, len(GOOD))),
    "base64": base64.b64encode(random.Random(2).randbytes(450)).decode(),
    "rot13": GOOD.translate(str.maketrans(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "nopqrstuvwxyzabcdefghijklmNOPQRSTUVWXYZABCDEFGHIJKLM")),
    "another alphabet in an English document": RUSSIAN,
    "random letters": "".join(random.Random(3).choice("etaoinshrdlu     ") for _ in range(900)),
}


@pytest.mark.parametrize("kind", list(JUNK))
def test_character_ngram_outliers_are_removed(kind):
    assert check(JUNK[kind])[1] == "corruption: character n-gram outlier"


def test_character_ngram_check_keeps_prose_and_code_and_follows_the_language():
    assert check(GOOD)[1] is None and check(CODE_PAGE)[1] is None
    cfg = HeuristicsConfig()
    for section in ("gopher_repetition", "gopher_quality", "c4", "fineweb"):
        getattr(cfg, section).enabled = False
    heuristics = Heuristics(cfg)
    assert heuristics.check(RUSSIAN, "en")[1] == "corruption: character n-gram outlier"
    assert heuristics.check(RUSSIAN, "ru")[1] is None  # no Russian reference: not scored
    assert heuristics.check(RUSSIAN)[1] is not None  # no language: scored as English
    cfg.corruption.max_char_bits = None
    assert heuristics.check(JUNK["shuffled characters"])[1] is None
    cfg.corruption.max_char_bits, cfg.corruption.char_bits_min_chars = 5.5, 10_000
    assert heuristics.check(JUNK["shuffled characters"])[1] is None  # too short to score


def test_the_reference_table_is_what_its_script_builds(tmp_path):
    import numpy as np

    from tools.corpus import char_ngrams
    built = char_ngrams.build(tmp_path / "en.npz")
    with np.load(built) as new, np.load(char_ngrams.REFERENCES["en"]) as shipped:
        assert str(shipped["alphabet"]) == char_ngrams.ALPHABET
        if str(new["source"]) == str(shipped["source"]):  # same Python, same topics
            assert (new["index"] == shipped["index"]).all()
            assert (new["count"] == shipped["count"]).all()


def test_a_corpus_run_counts_the_outliers_and_keeps_a_sample(tmp_path):
    import json
    from pathlib import Path

    from tools.cli import main as tools_main
    docs = [{"text": GOOD}, {"text": CODE_PAGE}] + [{"text": t, "kind": k} for k, t in JUNK.items()]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = Path(__file__).resolve().parent.parent / "configs" / "corpus" / "web.yaml"
    assert tools_main(["corpus", "run", str(config), f"inputs=[{tmp_path / 'docs.jsonl'}]",
                       f"output={tmp_path / 'out'}", "steps=[extract, heuristics]", "workers=1",
                       "samples_per_reason=2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"]["heuristics"]["removed"] == {
        "corruption: character n-gram outlier": len(JUNK)}
    assert summary["documents"] == 2
    sample = tmp_path / "out" / "removed" / "heuristics" / \
        "corruption-character-n-gram-outlier.jsonl"
    assert [json.loads(line)["kind"] for line in sample.read_text().splitlines()] == \
        list(JUNK)[:2]


# Prose with code references: 91% of its whitespace-separated words have a letter, 58% of the
# words spaCy's tokenizer makes of it (datatrove's FineWeb filters), each mark a word of its own.
CALLS = ["fs.open(path, flags)", "fs.read(fd, buf)", "net.connect(port, host)",
         "zlib.inflate(data, opts)", "dns.lookup(name, family)", "os.cpus()",
         "url.parse(href, true)"]
PUNCTUATED = "\n\n".join(f"{p[:-1]} (see `{c}`, [{k}]; \"{k}.{k + 1}\")."
                         for k, (p, c) in enumerate(zip(PROSE, CALLS), 1))
NAMES = ("open close read write stat chmod chown mkdir rmdir rename unlink watch access append "
         "copy link lstat mkdtemp readdir readlink realpath rm symlink truncate utimes").split()
LISTED = GOOD + "\n\nThe module's functions are " + " ".join(f"`{n}()`," for n in NAMES) + \
    " and a few more."


def test_words_as_tokens_count_punctuation_as_datatrove_does():
    from tools.corpus.word_tokens import tokens
    assert tokens("Call `fs.open(path, flags)`; it doesn't (see 2.3, e.g. Node.js's docs).") == [
        "Call", "`", "fs.open(path", ",", "flags", ")", "`", ";", "it", "does", "n't", "(", "see",
        "2.3", ",", "e.g.", "Node.js", "'s", "docs", ")", "."]
    as_tokens = {"heuristics": {"words": "tokens"}}
    assert check(PUNCTUATED)[1] is None  # whitespace words: the Gopher paper's count
    assert check(PUNCTUATED, **as_tokens)[1] == "gopher_quality: alphabetic words"
    assert check(PUNCTUATED, **as_tokens, gopher_quality={"min_alpha_words_ratio": 0.55})[1] \
        is None
    # "`open()`," is one word; as tokens, "( ) ` ," is a 4-gram 25 times over.
    assert check(LISTED)[1] is None
    assert check(LISTED, **as_tokens)[1] == "gopher_repetition: top 4-gram"


def _datatrove_dup_chars(words: list[str], n: int) -> int:
    """datatrove's find_all_duplicate, as written there."""
    unique, chars, idx = set(), 0, 0
    while idx < len(words) - n + 1:
        gram = "".join(words[idx:idx + n])
        if gram in unique:
            chars, idx = chars + len(gram), idx + n
        else:
            unique.add(gram)
            idx += 1
    return chars


@pytest.mark.parametrize("text", [LISTED, "a a a a a a a b a a a a a a",
                                  GOOD + " " + " ".join(f"{PROSE[1]} {i}" for i in range(3))])
def test_duplicate_ngram_share_as_tokens_is_datatrove_s(text):
    """Over the text's characters; left to right, a repeat skips the n-grams it overlaps."""
    from tools.corpus.heuristics import GopherRepetition, gopher_repetition
    from tools.corpus.word_tokens import tokens
    for n in (2, 5):
        share = _datatrove_dup_chars(tokens(text), n) / len(text)
        cfg = GopherRepetition(max_dup_line_frac=1, max_dup_para_frac=1, max_dup_line_char_frac=1,
                               max_dup_para_char_frac=1, max_top_ngram_char_frac={},
                               max_dup_ngram_char_frac={n: share - 1e-9})
        assert share and gopher_repetition(text, cfg, tokens(text)) == f"duplicate {n}-grams"
        cfg.max_dup_ngram_char_frac = {n: share + 1e-9}
        assert gopher_repetition(text, cfg, tokens(text)) is None
