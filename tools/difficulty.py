"""The Phi-4 question-difficulty filter over k independent teacher answers to one question."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

from phijax.eval.answers import normalize_answer


@dataclasses.dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str                 # "kept", "all_agree", "none_agree" or "too_few"
    reference: str | None       # the plurality answer (normalised), None if nothing parsed
    agreement: float            # plurality count / k (unparseable answers count in k)
    count: int                  # plurality count
    k: int                      # answers sampled
    reference_index: int | None  # first answer whose normalised form is the reference
    counts: dict                # normalised answer -> count (unparseable left out)
    tie: bool = False           # another answer had the same plurality count


def difficulty_filter(answers: Sequence[str | None], kind: str = "auto", *, min_agree: int = 2,
                      max_agreement: float = 1.0, min_k: int = 2,
                      percent_as_fraction: bool = False) -> Decision:
    """Phi-4's difficulty filter for one question from its k independent teacher answers.

    Drop as too easy ("all_agree") when the plurality share reaches `max_agreement` (default 1.0:
    all k answers parse and agree). Drop as too hard ("none_agree") when the plurality count is
    below `min_agree` (default 2: with k >= 2 no two answers agree, including when none parse).
    Fewer than `min_k` answers: dropped as "too_few". Otherwise keep, with the plurality answer as
    the reference and its share as `agreement`. Unparseable answers (None) never agree with
    anything but count in k. Ties for plurality go to the smallest normalised string, so the
    decision does not depend on the order the samples arrived in (`tie` flags them).
    """
    norm = [normalize_answer(a, kind, percent_as_fraction=percent_as_fraction) if a is not None else None
            for a in answers]
    k = len(norm)
    counts = Counter(a for a in norm if a is not None)
    if counts:
        top = max(counts.values())
        leaders = sorted(a for a, c in counts.items() if c == top)
        reference, count, tie = leaders[0], top, len(leaders) > 1
        ref_index = norm.index(reference)
    else:
        reference, count, tie, ref_index = None, 0, False, None
    agreement = count / k if k else 0.0
    if k < min_k:
        reason = "too_few"
    elif count < min_agree:
        reason = "none_agree"
    elif agreement >= max_agreement:
        reason = "all_agree"
    else:
        reason = "kept"
    return Decision(reason == "kept", reason, reference, agreement, count, k, ref_index, dict(counts), tie)
