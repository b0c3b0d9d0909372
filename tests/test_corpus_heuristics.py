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
            setattr(getattr(cfg, name), key, value)
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
