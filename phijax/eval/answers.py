"""Answer extraction: the final answer of a solution, in a canonical form, and code blocks.

`normalize_answer(text)` pulls the final answer out of a solution and puts it in a canonical form,
so that answers from independent teacher samples can be compared with `==`:

* where: the last `\\boxed{...}` (balanced braces, nesting ok), else the last "the answer is X" /
  "Answer: X" / "the correct option is B" cue, else (math) the last number in the text;
* numbers: `1,000` -> `1000`, `2.50` -> `5/2`, `4.0` -> `4`, `\\frac{6}{8}` / `\\dfrac68` / `6/8`
  / `0.75` -> `3/4` (exact rationals, so equal values give equal strings); `50\\%` -> `50`
  (or `1/2` with `percent_as_fraction=True`); `-` signs, degrees and `x =` prefixes handled;
* LaTeX wrappers (`$`, `\\(`, `\\text{}`, `\\left(`, `\\,` ...) are stripped; other answers
  (expressions, words) are compared as whitespace-free (and, without LaTeX, lowercased) strings;
* multiple choice (`kind="choice"`, and `"auto"`): `(B)`, `B)`, `answer: b`, `\\boxed{B}`,
  `The correct option is B` -> `"B"`. In "auto" a bare lowercase letter counts only at the
  end of its line ("the answer is a prime" is not choice A).

It returns None when nothing can be extracted; unparseable answers never agree with anything.
`extract_python(text)` is the code a reply gives in its last Python block.
"""
from __future__ import annotations

import re
from fractions import Fraction

ANSWER_KINDS = ("auto", "math", "choice")
_CUE = r"(?:final\s+answer|correct\s+(?:answer|option|choice)|answer|option|choice)"
_CHOICE_AFTER_CUE = re.compile(  # only the cue words ignore case: "is a prime" is not "is A"
    r"(?i:" + _CUE + r"\s*(?:is|:|=)?\s*(?:option\s+|choice\s+)?)(?:\(([A-Ja-j])\)|([A-J])\b(?![\w'-])|"
    r"([a-j])[).]?\s*$)", re.M)
_CHOICE_ALONE = re.compile(r"^\s*\(?([A-Ja-j])\s*[).:]?\s*$")
_ANSWER_CUE = re.compile(r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_CANONICAL_NUMBER = re.compile(r"-?\d+(?:/\d+)?")
_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DROP = re.compile(r"\\left|\\right|\\displaystyle|\\[,;:! ]|\\\(|\\\)|\\\[|\\\]|\$|\^\{?\\circ\}?|°")
_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces, nesting ok), or of
    `\\boxed 5`; None when there is none or its braces never close."""
    found = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not found:
        return None
    rest = text[found[-1].end():].lstrip()
    if not rest.startswith("{"):
        return rest.split()[0] if rest.split() else None
    depth = 0
    for j, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:j]
    return None


def _to_number(s: str) -> Fraction | None:
    s = s.replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)\(?(-?[\d.]+)\)?/\(?(-?[\d.]+)\)?", s)
    try:
        if m:
            value = Fraction(m[2]) / Fraction(m[3])
            return -value if m[1] else value
        if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _canonical(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def normalize_math(s: str, percent_as_fraction: bool = False) -> str | None:
    """Canonical string for one extracted answer (see module docstring); None if empty."""
    prev = None
    while prev != s:  # unwrap nested \text{\textbf{...}}
        prev, s = s, _WRAPPERS.sub(r"\1", s)
    s = _DROP.sub("", s).replace("{,}", ",").strip()
    while True:  # \frac{a}{b} -> (a)/(b), innermost first
        new = _FRAC.sub(lambda m: f"({m[1] or m[2]})/({m[3] or m[4]})", s)
        if new == s:
            break
        s = new
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s).strip().rstrip(".").strip()
    while s.startswith("{") and s.endswith("}") and last_boxed("\\boxed" + s) == s[1:-1]:
        s = s[1:-1].strip()  # redundant outer braces: {3} -> 3
    percent = s.endswith("%")
    s = s.rstrip("%").rstrip("\\").strip()
    if not s:
        return None
    value = _to_number(s)
    if value is None:  # "42 apples" -> 42; "(3)/(4)" -> 3/4
        m = re.fullmatch(r"(-?[\d,./]+)\s+[a-zA-Z][a-zA-Z\s]*", s)
        value = _to_number(m[1]) if m else _to_number(s.replace("(", "").replace(")", ""))
    if value is not None:
        return _canonical(value / 100 if percent and percent_as_fraction else value)
    s = re.sub(r"\s+", "", s)
    return s if "\\" in s else s.lower()


def _choice(text: str, strict: bool) -> str | None:
    m = _CHOICE_ALONE.match(text)
    if m:
        return m[1].upper()
    hits = list(_CHOICE_AFTER_CUE.finditer(text))
    if hits:
        h = hits[-1]
        return (h[1] or h[2] or h[3]).upper()
    if strict:  # kind="choice": the last "(B)" or "B)" anywhere
        found = re.findall(r"\(([A-J])\)|(?:^|\s)([A-J])\)", text, re.M)
        if found:
            return "".join(found[-1])
    return None


def normalize_answer(text: str | None, kind: str = "auto", *, percent_as_fraction: bool = False) -> str | None:
    """Extract and canonicalise the final answer of `text`; None when there is none.
    kind: "math" (numbers/expressions), "choice" (a letter A-J) or "auto" (either)."""
    if kind not in ANSWER_KINDS:
        raise ValueError(f"kind must be one of {ANSWER_KINDS}, got {kind!r}")
    if not text or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        inner = _WRAPPERS.sub(r"\1", boxed).strip()
        m = re.fullmatch(r"\(?([A-Ja-j])\)?", inner)
        if kind == "choice":
            return m[1].upper() if m else _choice(inner, strict=True)
        if kind == "auto" and m and m[1].isupper():
            return m[1]
        return normalize_math(boxed, percent_as_fraction)
    if kind != "math":
        letter = _choice(text, strict=kind == "choice")
        if letter or kind == "choice":
            return letter
    whole = normalize_math(text, percent_as_fraction)  # a bare answer: "$\\dfrac{6}{8}$", "-3"
    if whole is not None and _CANONICAL_NUMBER.fullmatch(whole):
        return whole
    cues = _ANSWER_CUE.findall(text)
    if cues:
        got = normalize_math(cues[-1].strip(), percent_as_fraction)
        if got is not None:
            return got
    numbers = _NUMBER.findall(text)
    return normalize_math(numbers[-1], percent_as_fraction) if numbers else None


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_python(text: str) -> str | None:
    """The last ```python (or ```py) block of a reply, else its last unlabelled ``` block;
    None when there is none."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text or "")]
    for langs in (("python", "py", "python3"), ("",)):
        found = [body for lang, body in blocks if lang in langs]
        if found:
            return found[-1].rstrip() + "\n"
    return None
