"""Multi-step arithmetic word problems with worked solutions: the post-training toy task.

A problem has 2 or 3 steps (+ and -, or "a groups of b" then + or -), small numbers and a
worked solution that chains the steps:

    Q: Tom has 12 apples. He buys 7 more and then gives 5 to Ann. How many apples does Tom
       have now?
    A: 12 + 7 = 19. 19 - 5 = 14. The answer is 14.

A template is a story frame (opening, how the steps are strung together, question); the
operations, numbers, names and items vary per problem. Train and held-out questions come from
disjoint templates (`TRAIN`, 10 frames; `HELDOUT`, 6 new frames with new openings, joiners and
questions), but both draw their steps from the same phrasings (`PERSON_STEPS`, `PLACE_STEPS`:
"buys 7 more" is +, "gives 5 to Ann" is -), so the skill transfers while the story frames are
new. Every intermediate result is non-negative and solutions stay under ~45 tokens.

    phijax-experiment arith-data --out DIR [--train N] [--heldout N] [--valid N] [--pts N]
                                 [--seed S] [--max-number M]

writes, atomically, `DIR/train.jsonl` (chats `{"id", "messages": [user Q, assistant A]}`),
`DIR/heldout.jsonl` (questions in the `phijax.eval.questions` format `{"id", "kind": "math", "prompt",
"answer"}` from the held-out templates), `DIR/valid.jsonl` (more questions from the held-out
templates, none equal to a held-out one: for choosing settings without looking at the held-out
questions) and `DIR/pts.jsonl` (the same format from the TRAIN templates with fresh numbers, no
prompt equal to a training one: the question set for PTS and DPO). The same arguments give the
same files byte for byte; a question's id names its split and index (`arith-train-000042`), and
its text is a function of (seed, split, index) alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from phijax.files import write_jsonl

NAMES = [("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"),
         ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"),
         ("Jack", "he"), ("Nora", "she")]
ITEMS = ["apples", "marbles", "stickers", "cards", "coins", "pencils", "shells", "stamps",
         "cookies", "books", "balls", "toys"]
CONTAINERS = [("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("basket", "baskets"),
              ("jar", "jars"), ("row", "rows")]  # of `groups` templates: a boxes of b
MAX_NUMBER = 10  # default range of starting amounts and additions
MAX_FACTOR = 5  # multiplications: groups in [2, MAX_FACTOR], each of [2, 9]


# What one step says, by operation, for a person who owns the items ({He} does it) and for a
# place that holds them (someone else does it). Train and held-out templates share these.
PERSON_STEPS = {"+": ["buys {x} more", "finds {x} more", "gets {x} more from {p}", "wins {x} more"],
                "-": ["gives {x} to {p}", "loses {x}", "sells {x}", "gives away {x}"]}
PLACE_STEPS = {"+": ["{p} puts in {x} more", "{p} adds {x} more", "{p} brings {x} more"],
               "-": ["{p} takes out {x}", "{p} takes away {x}", "{p} removes {x}"]}
# How the steps are strung together: one sentence, or one sentence per step with these openers.
JOINS = {"then": None, "first": ("First", "Then", "After that"),
         "next": ("First", "Next", "Finally")}


@dataclass(frozen=True)
class Template:
    """A story frame: `text` formats {a} (and {b} when `groups`: {a} {boxes} of {b}), {steps},
    {name}, {item}, {box}, {boxes}, {He}, {he}, {his}. The operations vary per problem: 2 or 3 steps of + and -,
    or, with `groups`, a multiplication then 1 or 2 steps."""
    name: str
    text: str
    actor: str = "person"  # person | place: which step phrasings (PERSON_STEPS, PLACE_STEPS)
    join: str = "then"  # a key of JOINS
    groups: bool = False

    def op_sequences(self) -> set[str]:
        if self.groups:
            return {"*" + op for op in "+-"} | {"*" + a + b for a in "+-" for b in "+-"}
        return {a + b for a in "+-" for b in "+-"} | {a + b + c for a in "+-" for b in "+-"
                                                       for c in "+-"}


_P, _Q = "{name} has {a} {item}.", "How many {item} does {name} have now?"
TRAIN = [
    Template("has-then", f"{_P} {{He}} {{steps}}. {_Q}"),
    Template("has-first", f"{_P} {{steps}} {_Q}", join="first"),
    Template("starts", "{name} starts with {a} {item}. {He} {steps}. How many {item} does "
             "{name} have at the end?"),
    Template("collection", "{name} keeps a collection of {a} {item}. Today {he} {steps}. How "
             "many {item} are in {his} collection now?"),
    Template("has-groups", "{name} has {a} {boxes} with {b} {item} in each {box}. {He} {steps}. "
             + _Q,
             groups=True),
    Template("buys-groups", "{name} buys {a} {boxes} of {item} with {b} in each {box}. {steps} "
             + _Q,
             join="first", groups=True),
    Template("box", "There are {a} {item} in a box. {steps}. How many {item} are in the box "
             "now?", actor="place"),
    Template("shelf", "A shelf holds {a} {item}. {steps} How many {item} are on the shelf now?",
             actor="place", join="first"),
    Template("teacher-groups", "A teacher puts {item} in {a} {boxes} with {b} in each {box}. "
             "{steps}. How many {item} are in the {boxes} now?", actor="place", groups=True),
    Template("shop", "A shop has {a} {item} in the morning. During the day {steps}. How many "
             "{item} does the shop have now?", actor="place"),
]

HELDOUT = [
    Template("bag", "{name}'s bag holds {a} {item}. {He} {steps}. How many {item} are in {his} "
             "bag now?"),
    Template("owns-next", "At first {name} owns {a} {item}. {steps} What is the number of "
             "{item} {name} has now?", join="next"),
    Template("gets-groups", "{name} gets {a} {boxes} of {item} with {b} {item} in each {box}. "
             "{He} {steps}. How many {item} does {name} have in total?", groups=True),
    Template("jar", "A jar contains {a} {item}. {steps}. How many {item} are in the jar at the "
             "end?", actor="place"),
    Template("there-are-groups", "There are {a} {boxes} with {b} {item} in each {box}. {steps} "
             "How many {item} are there now?", actor="place", join="next", groups=True),
    Template("room", "{name} counts {a} {item} in {his} room. {He} {steps}. How many "
             "{item} does {name} have now?"),
]


def numbers(ops: str, rng: random.Random, max_number: int = MAX_NUMBER,
            max_factor: int = MAX_FACTOR) -> list[int]:
    """Operands in solution order; every intermediate result non-negative, and a subtraction
    never takes away from nothing."""
    while True:
        if ops[0] == "*":
            values = [rng.randint(2, max_factor), rng.randint(2, 9)]
        else:
            values = [rng.randint(max(2, max_number // 4), max_number)]
        current = values[0] * values[-1] if ops[0] == "*" else values[0]
        for op in ops[len(values) - 1:]:
            if op == "*":
                raise ValueError(f"ops {ops!r}: '*' is only a first step")
            if op == "-" and current < 1:
                break
            x = rng.randint(1, max_number if op == "+" else current)
            values.append(x)
            current += x if op == "+" else -x
        else:
            return values


def solve(ops: str, values: list[int]) -> tuple[str, int]:
    """The worked solution (one equation per step, then "The answer is N.") and the answer."""
    current, lines = values[0], []
    for op, x in zip(ops, values[1:]):
        result = {"+": current + x, "-": current - x, "*": current * x}[op]
        lines.append(f"{current} {op} {x} = {result}.")
        current = result
    return " ".join(lines + [f"The answer is {current}."]), current


def _steps(template: Template, ops: str, values: list[int], rng: random.Random,
           pronoun: str, others: list[str]) -> str:
    """The steps of a problem as text, joined as the template says."""
    pool = PERSON_STEPS if template.actor == "person" else PLACE_STEPS
    clauses = [rng.choice(pool[op]).format(x=x, p=rng.choice(others))
               for op, x in zip(ops.lstrip("*"), values[2 if template.groups else 1:])]
    openers = JOINS[template.join]
    if openers is None:
        text = " and then ".join(clauses) if len(clauses) <= 2 else \
            ", ".join(clauses[:-1]) + ", and then " + clauses[-1]
        return text if template.actor == "person" else text[0].upper() + text[1:]
    subject = f"{pronoun} " if template.actor == "person" else ""
    return " ".join(f"{opener} {subject}{clause}." for opener, clause in zip(openers, clauses))


def make_problem(template: Template, rng: random.Random, max_number: int = MAX_NUMBER,
                 max_factor: int = MAX_FACTOR) -> tuple[str, str, int]:
    """(question, worked solution, answer) of one instance of `template`: 2 or 3 steps (the
    multiplication of a `groups` template counts as one), each + or - at random."""
    n = rng.choice((2, 3))
    ops = ("*" if template.groups else rng.choice("+-")) + \
        "".join(rng.choice("+-") for _ in range(n - 1))
    values = numbers(ops, rng, max_number, max_factor)
    solution, answer = solve(ops, values)
    (name, pronoun), *others = rng.sample(NAMES, 4)
    steps = _steps(template, ops, values, rng, pronoun, [o for o, _ in others])
    box, boxes = rng.choice(CONTAINERS)
    question = template.text.format(
        a=values[0], b=values[1], steps=steps, name=name, item=rng.choice(ITEMS), box=box,
        boxes=boxes,
        He=pronoun.capitalize(), he=pronoun, his="his" if pronoun == "he" else "her")
    return question, solution, answer


def generate(split: str, n: int, seed: int = 0, max_number: int = MAX_NUMBER,
             max_factor: int = MAX_FACTOR, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` problems of `split` ("train" and "pts" use TRAIN templates, "heldout" and "valid"
    HELDOUT), each {"id", "template", "question", "solution", "answer"}; templates in turn,
    numbers from (seed, split, index). Questions in `exclude` are drawn again."""
    templates = HELDOUT if split in ("heldout", "valid") else TRAIN
    out = []
    for i in range(n):
        rng = random.Random(f"arith/{seed}/{split}/{i}")
        template = templates[i % len(templates)]
        question, solution, answer = make_problem(template, rng, max_number, max_factor)
        while question in exclude:
            question, solution, answer = make_problem(template, rng, max_number, max_factor)
        out.append({"id": f"arith-{split}-{i:06d}", "template": template.name,
                    "question": question, "solution": solution, "answer": answer})
    return out


def as_chat(p: dict) -> dict:
    return {"id": p["id"], "messages": [{"role": "user", "content": p["question"]},
                                        {"role": "assistant", "content": p["solution"]}]}


def as_question(p: dict) -> dict:
    return {"id": p["id"], "kind": "math", "prompt": p["question"], "answer": str(p["answer"])}


def write_task(out: str | Path, train: int = 20000, heldout: int = 500, pts: int = 1000,
               seed: int = 0, max_number: int = MAX_NUMBER,
               max_factor: int = MAX_FACTOR, valid: int = 0) -> dict[str, int]:
    """Write train.jsonl, heldout.jsonl, valid.jsonl and pts.jsonl under `out`; returns the
    counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(seed=seed, max_number=max_number, max_factor=max_factor)
    train_problems = generate("train", train, **kw)
    seen = {p["question"] for p in train_problems}
    write_jsonl(out / "train.jsonl", [as_chat(p) for p in train_problems])
    heldout_problems = generate("heldout", heldout, **kw)
    write_jsonl(out / "heldout.jsonl", [as_question(p) for p in heldout_problems])
    heldout_questions = {p["question"] for p in heldout_problems}
    write_jsonl(out / "valid.jsonl",
                [as_question(p) for p in generate("valid", valid, exclude=heldout_questions, **kw)])
    write_jsonl(out / "pts.jsonl", [as_question(p) for p in generate("pts", pts, exclude=seen, **kw)])
    return {"train": train, "heldout": heldout, "valid": valid, "pts": pts}
