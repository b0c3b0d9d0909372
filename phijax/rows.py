"""`Rows`: the running batch of sample rows that `Sampler.generate` and `phijax serve` decode.

The batch holds the rows' KV caches and last tokens on the device, and per row on the host its
owner (whoever asked for it), its sampling parameters, its step (the index of its next token)
and its first cache slot. `admit(seqs)` prefills new prompts and merges their rows in;
`step()` merges first where that is due (finished rows dropped when that shrinks the batch,
the cache grown when the next segment would run past its end, or compacted when the slots
before every live row's first one are a quarter of it), runs one decode segment and returns
each row's new tokens. See `phijax.decoding` for the programs and the slot layout.

Nothing changes if a program fails: a merge writes new caches (for its length the old and new
ones are both held) and replaces the old state only once it has succeeded; a failed decode
segment (whose caches were donated) leaves an empty batch (`reset`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from phijax.decoding import (Choice, Picked, pow2, programs, rows_bucket, slots_bucket,
                             top_bucket)

# Per row, on the host; every key but "top" also goes to the device programs.
ROW_TYPES = {"seeds": np.uint32, "draws": np.uint32, "temperature": np.float32,
             "top_k": np.int32, "top_p": np.float32, "max_new": np.int32, "step": np.int32,
             "pad": np.int32, "top": np.int32}


@dataclass
class Seq:
    """A prompt to prefill once, and the sample rows that continue it: (owner, draw, step)
    each, `step` the index of the row's next token (0, or the number it already has)."""
    prompt: list[int]
    request: Any  # phijax.sampling.Request
    rows: list[tuple[Any, int, int]]


class Emit(NamedTuple):
    """New tokens of one row: their log-probs, per token the row's `top_logprobs` most likely
    (id, log-prob) pairs (None when it asks for none), and whether the row is finished."""
    owner: Any
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None
    done: bool


def _new_rows(seqs: list[Seq]) -> tuple[list, dict]:
    """The owners and host row values of the seqs' rows, in order."""
    owners, values, stops = [], {k: [] for k in ROW_TYPES}, []
    for seq in seqs:
        r = seq.request
        for owner, draw, step in seq.rows:
            owners.append(owner)
            stops.append(r.stop_ids)
            for k, v in (("seeds", r.seed % 2**32), ("draws", draw), ("step", step),
                         ("temperature", r.temperature), ("top_k", r.top_k), ("top_p", r.top_p),
                         ("max_new", r.max_new_tokens), ("pad", 0), ("top", r.top_logprobs)):
                values[k].append(v)
    row = {k: np.array(v, ROW_TYPES[k]) for k, v in values.items()}
    row["stop_ids"] = np.full((len(owners), max(4, pow2(max(map(len, stops))))), -1, np.int32)
    for i, s in enumerate(stops):
        row["stop_ids"][i, :len(s)] = s
    return owners, row


def _take(row: dict, index) -> dict:
    return {k: v[index] for k, v in row.items()}


def _concat(parts: list[dict]) -> dict:
    """Row dicts one after another (stop-id lists padded to the widest)."""
    width = max(p["stop_ids"].shape[1] for p in parts)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1)
    return {k: np.concatenate([pad(p[k]) if k == "stop_ids" else p[k] for p in parts])
            for k in parts[0]}


def _empty_rows() -> dict:
    return {**{k: np.zeros(0, t) for k, t in ROW_TYPES.items()},
            "stop_ids": np.zeros((0, 4), np.int32)}


def _how(row: dict, mask) -> Choice:
    t = row["temperature"][mask]
    sampling = t > 0
    filters = (row["top_k"][mask] > 0) | (row["top_p"][mask] < 1)
    return Choice(greedy=bool((t == 0).any()), sample=bool(sampling.any()),
                  filtering=bool((filters & sampling).any()),
                  top=top_bucket(int(row["top"][mask].max(initial=0))))


def _prompts(seqs: list[Seq], n_rows: int):
    """(B, P) left-padded prompts, their padding (B,), and each new row's prompt (R,)."""
    p = slots_bucket(max(len(s.prompt) for s in seqs))
    prompts = np.zeros((pow2(len(seqs)), p), np.int32)
    pad = np.full(prompts.shape[0], p - 1, np.int32)  # unused prompt slots hold one token
    for k, s in enumerate(seqs):
        prompts[k, p - len(s.prompt):] = s.prompt
        pad[k] = p - len(s.prompt)
    source = [k for k, s in enumerate(seqs) for _ in s.rows]
    source += [0] * (pow2(n_rows) - n_rows)
    return prompts, pad, np.array(source, np.int32)


def _emits(owners, row, picked, counts, done) -> list[Emit]:
    """Emits of the rows with new tokens: picked holds (R, T) arrays, counts (R,) how many,
    done (R,) whether the row has finished."""
    out = []
    for k, owner in enumerate(owners):
        n = int(counts[k])
        if owner is None or not n:
            continue
        top = int(row["top"][k])
        tops = None if not top else [
            list(zip(picked.top_ids[k, s, :top].tolist(), picked.top_logprobs[k, s, :top].tolist()))
            for s in range(n)]
        out.append(Emit(owner, picked.token[k, :n].tolist(), picked.logprob[k, :n].tolist(), tops,
                        bool(done[k])))
    return out


class Rows:
    """The running batch over a `Sampler`'s parameters (its `put` shards row arrays)."""

    def __init__(self, sampler, segment: int = 32):
        self.sampler, self.segment = sampler, segment
        self._prefill, self._merge, self._decode = programs(dataclasses.astuple(sampler.cfg))
        self.reset()

    def reset(self) -> None:
        """An empty batch."""
        self.caches = self.token = None
        self.slot = self.slots = 0  # the slot the next step writes; the cache's size
        self.owners: list = []      # per row; None for padding
        self.done = np.zeros(0, bool)
        self.row = _empty_rows()

    @property
    def live(self) -> int:
        return int((~self.done).sum())

    def cancel(self, drop: Callable[[Any], bool]) -> list:
        """Stop the rows whose owner `drop` picks (they leave at the next merge); their owners."""
        hit = [k for k, o in enumerate(self.owners) if o is not None and not self.done[k]
               and drop(o)]
        self.done[hit] = True
        return [self.owners[k] for k in hit]

    def _device_rows(self, row: dict) -> dict:
        keys = [k for k in row if k != "top"]
        return dict(zip(keys, self.sampler.put(*(row[k] for k in keys))))

    def _start(self, live) -> int:
        """The first cache slot any live row uses."""
        return int(self.row["pad"][live].min()) if len(live) else self.slot

    def admit(self, seqs: list[Seq]) -> list[Emit]:
        """Prefill `seqs` and merge their rows into the batch (those not already finished):
        each new row's first token."""
        s = self.sampler
        owners, new = _new_rows(seqs)
        prompts, ppad, source = _prompts(seqs, len(owners))
        new = _take(new, np.minimum(np.arange(source.size), len(owners) - 1))
        new["pad"] = ppad[source]
        how = _how(new, np.arange(source.size) < len(owners))
        caches, pick, done = self._prefill(how, s.vocab_limit, s.params,
                                           *s.put(prompts, ppad, source), self._device_rows(new))
        picked, done = jax.device_get((_first(pick), done))
        emits = _emits(owners, new, picked, np.ones(len(owners), np.int32), done)
        keep = np.flatnonzero(~done[:len(owners)])
        new["step"] = new["step"] + 1  # the prefill drew each row's token at its step
        if len(keep):
            live = np.flatnonzero(~self.done)
            target = max(self.slot - self._start(live), max(len(q.prompt) for q in seqs))
            added = ([owners[k] for k in keep], _take(new, keep), caches, pick.token, keep,
                     prompts.shape[1])
            self._regroup(live, target, added)
        return emits

    def _regroup(self, live, target: int, added=None) -> None:
        """Merge the live rows (and `added` new ones: owners, host rows, their prefill's caches
        and tokens, their prefill rows, its length) into the smallest bucket, at slot `target`,
        in a cache with room for the next segment."""
        new_owners, new_row, new_dev = [], None, None
        if added is not None:
            new_owners, new_row, caches, token, keep, p = added
            at = np.full(token.shape[0], 1 << 30, np.int32)  # past the end: not written
            at[keep] = len(live) + np.arange(len(keep))
            new_row["pad"] = new_row["pad"] + (target - p)
            new_dev = (caches, token, *self.sampler.put(at), np.int32(target - p))
        n = len(live) + len(new_owners)
        rows, slots = rows_bucket(n), slots_bucket(target + self.segment)
        index = np.zeros(rows, np.int32)
        index[:len(live)] = live
        shift = target - self.slot
        caches, token = self._merge(slots, self.caches, self.token, *self.sampler.put(index),
                                    np.int32(shift), new_dev)
        row = _take(self.row, live)
        row["pad"] = row["pad"] + shift
        row = _concat([row] + ([new_row] if new_row is not None else []))
        self.row = _concat([row, _take(row, np.zeros(rows - n, np.int32))])
        self.owners = [self.owners[k] for k in live] + new_owners + [None] * (rows - n)
        self.done = np.arange(rows) >= n
        self.caches, self.token, self.slot, self.slots = caches, token, target, slots

    def step(self) -> list[Emit]:
        """One decode segment of the live rows (after a merge where one is due): their new
        tokens."""
        live = np.flatnonzero(~self.done)
        if not len(live):
            return []
        target = self.slot - self._start(live)  # with the slots no live row uses dropped
        if (rows_bucket(len(live)) < len(self.owners) or self.slot + self.segment > self.slots
                or slots_bucket(target + self.segment) <= self.slots * 3 // 4):
            self._regroup(live, target)
        s = self.sampler
        how = _how(self.row, ~self.done)
        try:
            caches, token, done, count, out, steps = self._decode(
                how, s.vocab_limit, self.segment, s.params, self.caches, self.token,
                *s.put(self.done), np.int32(self.slot), self._device_rows(self.row))
            done, count, out, steps = jax.device_get((done, count, out, steps))
        except Exception:
            self.reset()  # the caches were donated to the failed program
            raise
        emits = _emits(self.owners, self.row, out, count, done)
        self.caches, self.token, self.done = caches, token, done | self.done
        self.row["step"] += steps
        self.slot += int(steps)
        return emits


def _first(pick: Picked) -> Picked:
    """A prefill's Picked as (R, 1) token arrays, the shape `_emits` reads."""
    return Picked(pick.token[:, None], pick.logprob[:, None], pick.top_ids[:, None],
                  pick.top_logprobs[:, None])
