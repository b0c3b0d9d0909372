"""A toy world from a seed: people, towns, items and roads, the web text that states its facts,
and two held-out sets never in training.

* facts: a person lives in a town, works a job, was born in a year; a town lies on a river and
  was founded in a year; an item is sold in a town at a price; a road joins two towns;
* web documents: each fact is stated `mentions` times, in different documents, by varied
  sentences, shuffled among other facts and distractor sentences that state nothing;
* knowledge questions (SimpleQA-style JSONL: problem, answer): short questions about facts the
  web documents state, phrased unlike them;
* reasoning questions (phijax's question JSONL: id, kind, prompt, answer): multi-step problems
  over the world's rules (prices times quantities, change, ages, road distances) whose facts are
  all given in the question; `problem(...)` makes the same families for the teacher's exercises;
* both sets also as multiple choice (phijax eval's `choice` JSONL), scored by likelihood, which
  shows what a model too small to answer in words has learned.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

JOBS = ("baker", "smith", "weaver", "miller", "potter", "tailor", "fisher", "mason", "carter",
        "brewer", "cooper", "glazier")
ITEMS = ("lamp", "rope", "kettle", "basket", "candle", "saddle", "bucket", "ladder", "lantern",
         "blanket", "hammer", "barrel", "shovel", "bell", "compass", "mirror")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

STATEMENTS = {  # relation -> ways the web states it ({s} subject, {v} value)
    "lives_in": ("{s} lives in {v}.", "These days {s} makes a home in {v}.",
                 "Ask around {v} and you will meet {s}, who lives there."),
    "job": ("{s} works as a {v}.", "By trade {s} is a {v}.", "{s} earns a living as a {v}."),
    "born": ("{s} was born in {v}.", "The year {v} saw the birth of {s}.",
             "{s}, born in {v}, remembers the old days."),
    "river": ("{s} lies on the river {v}.", "The river {v} runs through {s}.",
              "Boats on the {v} stop at {s}."),
    "founded": ("{s} was founded in {v}.", "The first houses of {s} went up in {v}.",
                "Since {v}, when it was founded, {s} has grown."),
    "price": ("In {t}, a {s} costs {v} coins.", "A {s} sells for {v} coins in {t}.",
              "The market of {t} asks {v} coins for a {s}."),
    "road": ("The road from {s} to {t} is {v} km long.", "It is {v} km by road from {s} to {t}.",
             "Travellers walk {v} km between {s} and {t}."),
}
QUESTIONS = {  # relation -> the held-out question ({s}, {t})
    "lives_in": "Which town is home to {s}?", "job": "What is the trade of {s}?",
    "born": "In which year did {s} come into the world?", "river": "Which river flows by {s}?",
    "founded": "What year was the town of {s} established?",
    "price": "How many coins does one {s} cost at the {t} market?",
}
DISTRACTORS = ("The weather in {t} was mild that spring.", "Many people came to the fair in {t}.",
               "{p} once said that the roads were muddy.", "Nobody remembers who painted the "
               "old sign in {t}.", "{p} likes to talk about the harvest.",
               "Some say the best bread is found far from {t}.", "A letter from {p} arrived late.",
               "The bridge near {t} was repaired again.")


@dataclass
class Fact:
    id: str
    relation: str
    subject: str
    value: str
    place: str = ""  # the town of a price, the far end of a road

    def statement(self, rng: random.Random, canonical: bool = False) -> str:
        forms = STATEMENTS[self.relation]
        form = forms[0] if canonical else rng.choice(forms)
        return form.format(s=self.subject, v=self.value, t=self.place)


@dataclass
class World:
    seed: int
    people: list[str]
    towns: list[str]
    facts: list[Fact]
    roads: dict = field(default_factory=dict)  # (town, town) -> km
    prices: dict = field(default_factory=dict)  # (item, town) -> coins
    born: dict = field(default_factory=dict)  # person -> year


def _names(rng: random.Random, n: int, syllables: int, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        name = name.capitalize() + rng.choice(("", "n", "r", "l"))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_world(seed: int, people: int = 60, towns: int = 8) -> World:
    rng = random.Random(seed)
    taken: set = set()
    first, last = _names(rng, people, 2, taken), _names(rng, people, 3, taken)
    names = [f"{a} {b}" for a, b in zip(first, last)]
    places = _names(rng, towns, 3, taken)
    rivers = _names(rng, towns, 2, taken)
    w = World(seed, names, places, [])
    add = lambda rel, s, v, t="": w.facts.append(Fact(f"f{len(w.facts)}", rel, s, str(v), t))
    for i, t in enumerate(places):
        add("river", t, rivers[i])
        add("founded", t, rng.randint(1200, 1700))
        for item in rng.sample(ITEMS, 3):
            w.prices[item, t] = rng.randint(2, 30)
            add("price", item, w.prices[item, t], t)
    for a, b in zip(places, places[1:]):  # a chain of roads through every town
        w.roads[a, b] = rng.randint(3, 40)
        add("road", a, w.roads[a, b], b)
    for p in names:
        w.born[p] = rng.randint(1800, 1900)
        add("lives_in", p, rng.choice(places))
        add("job", p, rng.choice(JOBS))
        add("born", p, w.born[p])
    return w


# ---------------------------------------------------------------- web text

def web_documents(w: World, mentions: int = 3, facts_per_doc: int = 4,
                  distractors: int = 2) -> list[dict]:
    """Documents {id, text, facts}: every fact stated `mentions` times across different
    documents, in shuffled order among distractor sentences."""
    rng = random.Random(w.seed + 1)
    slots = [f for f in w.facts for _ in range(mentions)]
    rng.shuffle(slots)
    docs = []
    while slots:
        chosen, rest = [], []
        for f in slots:  # a fact at most once per document
            (rest if len(chosen) == facts_per_doc or f in chosen else chosen).append(f)
        slots = rest
        lines = [f.statement(rng) for f in chosen]
        lines += [rng.choice(DISTRACTORS).format(t=rng.choice(w.towns), p=rng.choice(w.people))
                  for _ in range(distractors)]
        rng.shuffle(lines)
        docs.append({"id": f"web-{len(docs)}", "text": " ".join(lines),
                     "facts": [f.id for f in chosen]})
    return docs


def restatement(facts: list[Fact]) -> str:
    """The clean web rewrite of some facts: one plain sentence each, grouped by subject."""
    ordered = sorted(facts, key=lambda f: (f.subject, f.relation))
    return "\n".join(f.statement(random.Random(0), canonical=True) for f in ordered)


def code_documents(w: World, n: int) -> list[dict]:
    """Toy Python: small functions over the world's rules, with a call and its result."""
    rng = random.Random(w.seed + 2)
    docs = []
    for i in range(n):
        (item, town), price = rng.choice(sorted(w.prices.items()))
        k = rng.randint(2, 9)
        docs.append({"id": f"code-{i}", "text": (
            f"def total_cost(price, count):\n    \"\"\"Coins paid for `count` items at `price` "
            f"each.\"\"\"\n    return price * count\n\n\n# {count_word(k)} {item}s in {town}\n"
            f"assert total_cost({price}, {k}) == {price * k}\n")})
    return docs


def acquired_documents(n: int, seed: int) -> list[dict]:
    """Reference documents: a glossary of the world's trades and measures (no world facts)."""
    rng = random.Random(seed + 3)
    docs = []
    for i in range(n):
        job = rng.choice(JOBS)
        docs.append({"id": f"acquired-{i}", "text": (
            f"Glossary. {job.capitalize()}: a person whose trade is that of a {job}. Coin: the "
            f"unit of price at every market. Kilometre (km): the unit of road length; a journey "
            f"over several roads is as long as its roads together. Entry {i}.")})
    return docs


def count_word(k: int) -> str:
    return ("zero one two three four five six seven eight nine ten".split() + [str(k)])[min(k, 11)]


# ---------------------------------------------------------------- problems

FAMILIES = ("purchase", "change", "age", "road")


def problem(w: World, family: str, rng: random.Random, anchor: Fact | None = None) -> dict:
    """A problem of `family` with its facts in the text: {prompt, answer, steps, solution}
    (`solution`: numbered steps ending with \\boxed{answer}). `anchor` (a price, birth or road
    fact) is used when it fits the family."""
    person = anchor.subject if anchor and anchor.relation == "born" else rng.choice(w.people)
    if family in ("purchase", "change"):
        (i1, t), p1 = ((anchor.subject, anchor.place), int(anchor.value)) \
            if anchor and anchor.relation == "price" else rng.choice(sorted(w.prices.items()))
        a = rng.randint(2, 6)
        if family == "change":
            paid = (a * p1 // 10 + 1 + rng.randint(0, 2)) * 10
            return _done(f"In {t}, a {i1} costs {p1} coins. {person} buys {a} of them and pays "
                         f"with {paid} coins. How many coins does {person} get back?",
                         [f"{a} x {p1} = {a * p1} coins for the {i1}s.",
                          f"{paid} - {a * p1} = {paid - a * p1} coins back."])
        i2 = rng.choice([x for x in ITEMS if x != i1])
        p2, b = rng.randint(2, 30), rng.randint(2, 6)
        return _done(f"In {t}, a {i1} costs {p1} coins and a {i2} costs {p2} coins. {person} "
                     f"buys {a} {i1}s and {b} {i2}s. How many coins does {person} pay?",
                     [f"{a} x {p1} = {a * p1} coins for the {i1}s.",
                      f"{b} x {p2} = {b * p2} coins for the {i2}s.",
                      f"{a * p1} + {b * p2} = {a * p1 + b * p2} coins in all."])
    if family == "age":
        other = rng.choice([p for p in w.people if p != person])
        y1, y2 = w.born[person], rng.randint(1800, 1900)
        year = max(y1, y2) + rng.randint(5, 60)
        return _done(f"{person} was born in {y1} and {other} in {y2}. In {year}, how old are "
                     f"{person} and {other} together?",
                     [f"{year} - {y1} = {year - y1} years for {person}.",
                      f"{year} - {y2} = {year - y2} years for {other}.",
                      f"{year - y1} + {year - y2} = {2 * year - y1 - y2} years together."])
    roads = list(w.roads.items())  # the chain's order
    start = roads.index(next(r for r in roads if r[0][0] == anchor.subject)) \
        if anchor and anchor.relation == "road" else rng.randrange(len(roads))
    start = min(start, max(0, len(roads) - 2))
    legs = roads[start:start + rng.randint(2, 3)]
    text = " ".join(f"The road from {a} to {b} is {km} km long." for (a, b), km in legs)
    sums = [sum(km for _, km in legs[:i + 1]) for i in range(len(legs))]
    steps = [f"{sums[i - 1]} + {legs[i][1]} = {sums[i]} km as far as {legs[i][0][1]}."
             for i in range(1, len(legs))]
    return _done(f"{text} How many km is it from {legs[0][0][0]} to {legs[-1][0][1]} along these "
                 f"roads?", [f"Start with {legs[0][1]} km to {legs[0][0][1]}.", *steps])


def _done(prompt: str, steps: list[str]) -> dict:
    answer = steps[-1].split(" = ")[1].split()[0]
    lines = [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    return {"prompt": prompt, "answer": answer, "steps": len(steps),
            "solution": "\n".join(lines) + f"\n\\boxed{{{answer}}}"}


# ---------------------------------------------------------------- held-out sets

def knowledge_questions(w: World, n: int) -> list[dict]:
    """SimpleQA-style records {problem, answer} about facts the web states (roads excepted)."""
    rng = random.Random(w.seed + 4)
    facts = rng.sample([f for f in w.facts if f.relation in QUESTIONS],
                       min(n, sum(f.relation in QUESTIONS for f in w.facts)))
    return [{"id": f"knowledge-{f.id}", "problem": QUESTIONS[f.relation].format(
        s=f.subject, t=f.place), "answer": f.value} for f in facts]


def reasoning_questions(w: World, n: int) -> list[dict]:
    """Question records {id, kind: math, prompt, answer, solution}: multi-step problems, facts
    given. The prompt ends as the synthetic exercises' problems do before their solution (a
    blank line), so a base model is asked in the format it read."""
    rng = random.Random(w.seed + 5)
    out = []
    for i in range(n):
        p = problem(w, FAMILIES[i % len(FAMILIES)], rng)
        out.append({"id": f"reasoning-{i}", "kind": "math", "prompt": f"{p['prompt']}\n\n",
                    "answer": p["answer"], "solution": p["solution"]})
    return out


# ---------------------------------------------------------------- the same sets as choices

def knowledge_choices(w: World, questions: list[dict], k: int = 4) -> list[dict]:
    """Each knowledge question as a `k`-way choice (phijax eval's `choice` task): the fact's
    value and `k - 1` other values the world gives the same relation (other towns, trades,
    years, rivers, prices), each scored as the continuation of "Question: ...\nAnswer:"."""
    rng = random.Random(w.seed + 6)
    facts = {f"knowledge-{f.id}": f for f in w.facts}
    values: dict = {}
    for f in w.facts:
        values.setdefault(f.relation, set()).add(f.value)
    out = []
    for q in questions:
        fact = facts[q["id"]]
        options = [fact.value] + rng.sample(sorted(values[fact.relation] - {fact.value}), k - 1)
        rng.shuffle(options)
        out.append({"id": q["id"], "question": f"Question: {q['problem']}\nAnswer:",
                    "choices": [f" {v}" for v in options], "answer": options.index(fact.value)})
    return out


def reasoning_choices(questions: list[dict], seed: int, k: int = 4) -> list[dict]:
    """Each reasoning question as a `k`-way choice between worked solutions that differ only in
    the last step's result (and so the boxed answer): the right one and `k - 1` off by 1, 2 or
    10 either way. Scored as continuations of the problem, they ask whether the model prefers
    correct arithmetic, in the exercises' format."""
    rng = random.Random(seed + 7)
    out = []
    for q in questions:
        right = int(q["answer"])
        wrong = rng.sample([right + d for d in (-10, -2, -1, 1, 2, 10) if right + d > 0], k - 1)
        options = [right] + wrong
        rng.shuffle(options)
        head, _, last = q["solution"].rpartition("\n\\boxed{")
        step, _, tail = head.rpartition(f"= {right} ")
        texts = [f"{step}= {v} {tail}\n\\boxed{{{v}}}" for v in options]
        out.append({"id": q["id"], "question": q["prompt"], "choices": texts,
                    "answer": options.index(right)})
    return out
