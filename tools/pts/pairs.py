"""DPO pairs from pivotal tokens: the alternative token comes from the rollouts already sampled."""
from __future__ import annotations

from collections import Counter

from tools.pts.search import Estimate, Pivot, PTSConfig, Rollouts, Stats, find_pivots


def _most_frequent(tokens: list[int], exclude: int) -> int | None:
    counts = Counter(t for t in tokens if t != exclude)
    return min(counts, key=lambda t: (-counts[t], t)) if counts else None


def pair_tokens(pivot: Pivot, rollouts: Rollouts) -> tuple[int, int] | None:
    """(chosen, rejected) for a pivotal token from the rollouts at its prefix, or None."""
    if pivot.p_after > pivot.p_before:
        other = _most_frequent(rollouts.first(False), pivot.token)
        return None if other is None else (pivot.token, other)
    other = _most_frequent(rollouts.first(True), pivot.token)
    return None if other is None else (other, pivot.token)


def pts(questions: list[tuple[str | int, list[int]]], estimate: Estimate, cfg: PTSConfig,
        log=None) -> tuple[list[dict], Stats]:
    """DPO pair records for (question id, prompt ids) pairs, with a pluggable estimator."""
    kept, d, stats = find_pivots(len(questions), estimate, cfg, log)
    pairs = []
    for pv in kept:
        tokens = pair_tokens(pv, d.memo[pv.question, pv.prefix])
        if tokens is None:
            stats.no_alternative += 1
            continue
        qid, prompt = questions[pv.question]
        pairs.append({
            "id": f"{qid}/pts/{pv.answer}/{len(pv.prefix)}",
            "prompt_ids": list(prompt) + list(pv.prefix),
            "chosen_ids": [tokens[0]], "rejected_ids": [tokens[1]],
            "question_id": qid, "prefix_len": len(pv.prefix),
            "p_before": pv.p_before, "p_after": pv.p_after, "p_gap": cfg.p_gap,
            "samples_used": d.sampled[pv.question], "kind": "pts"})
    stats.pairs = len(pairs)
    return pairs, stats


