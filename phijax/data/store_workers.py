"""One token store built by any number of workers on any machines (`phijax data tokenize --shared`).

Every worker runs the same command against the same OUT. Each claims shards, tokenizes them into
part files beside the store and marks them done; the worker that finds every part done claims
the assembly and writes the store, once; the others exit once it is there. Beside OUT:

    OUT.partial/
      plan.0001.json                 what is built (a hash of the inputs' stamps, the tokenizer
                                     and the text field), by whom, when
      0001/parts/000012.npz, .json   shard 12's tokens; its .json, written last, marks it done
      0001/claims/000012.0001.json   a claim on shard 12: owner (host, pid), heartbeat
      0001/claims/assemble.0001.json the claim on writing the store

For a gs:// or s3:// OUT all of it is in the bucket; for a local OUT it is on OUT's file system,
which the machines must share (NFS, Filestore, Lustre...). Every worker must read the same
inputs: a bucket prefix, a shared file system, or copies with the same sizes and modification
times (`rsync -t`); a worker whose inputs differ stops with an error.

A claim is made by creating the next name of its generation only if it is absent
(`paths.create_if_absent`: a hard link locally, a conditional write on a bucket, so one of any
number of workers wins). Its owner rewrites the heartbeat every stale_after / 4 seconds (at most
60); a claim whose heartbeat is older than `stale_after` is a killed worker's, and the next
generation takes the shard (or the assembly) over. A shard's part holds the same bytes whoever
tokenizes it, so a slow owner that finishes after being taken over does no harm. Heartbeats carry
the writer's clock: the machines keep their clocks in step (NTP) to well within `stale_after`.

Other inputs than plan.N's start plan.N+1 once no heartbeat has come for `stale_after` (a build
that was abandoned); while plan.N's workers are alive, a worker of another plan stops with an
error. The store is written, manifest.json last, before OUT.partial is removed; a worker that
leaves a complete store removes what is left of OUT.partial (a late heartbeat's file).
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from phijax import paths
from phijax.data.corpus import Shard
from phijax.data.store import _assemble, _tokenize_shard, default_workers, is_built, plan_build
from phijax.data.tokenizer import Tokenizer
from phijax.errors import DataError

log = logging.getLogger("phijax")
ASSEMBLE = "assemble"


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _read_json(path) -> dict | None:
    """A claim or plan file; None when it is gone (the build finished) or being written."""
    try:
        return json.loads(paths.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass
class Board:
    """The claims and parts of one plan, and the claims this worker holds."""
    dir: paths.AnyPath
    stale_after: float
    held: dict = field(default_factory=dict)  # task -> (claim path, body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def parts(self):
        return self.dir / "parts"

    def _list(self, folder: str) -> list[str]:
        """The names in a folder of the board; [] once the board is gone (the store is built:
        the worker that built it removes the board, maybe while this one looks)."""
        try:
            return paths.listdir(self.dir / folder)
        except FileNotFoundError:
            return []

    def done(self) -> set[int]:
        return {int(m.group(1)) for name in self._list("parts")
                if (m := re.fullmatch(r"(\d{6})\.json", name))}

    def claims(self) -> dict[str, int]:
        """task -> its newest claim's generation."""
        newest = {}
        for name in self._list("claims"):
            if m := re.fullmatch(r"(\d{6}|assemble)\.(\d{4,})\.json", name):
                newest[m.group(1)] = max(newest.get(m.group(1), 0), int(m.group(2)))
        return newest

    def _path(self, task: str, generation: int):
        return self.dir / "claims" / f"{task}.{generation:04d}.json"

    def claim(self, task: str, generation: int) -> bool:
        """Claim `task` over its newest claim, `generation` (0: none), if that one is stale
        and no other worker claims it first."""
        previous = None
        if generation:
            previous = _read_json(self._path(task, generation))
            if previous is None or time.time() - previous["heartbeat"] <= self.stale_after:
                return False
        now = time.time()
        body = {**_owner(), "claimed": now, "heartbeat": now}
        path = self._path(task, generation + 1)
        try:
            if not paths.create_if_absent(path, json.dumps(body)):
                return False
        except FileNotFoundError:  # the board was removed under it: the store is built
            return False
        with self.lock:
            self.held[task] = (path, body)
        if previous is not None:
            what = "the assembly" if task == ASSEMBLE else f"shard {int(task)}"
            log.warning("%s: taken over from %s:%s, whose heartbeat stopped %.0f s ago", what,
                        previous["host"], previous["pid"], now - previous["heartbeat"])
        return True

    def claim_shard(self, n: int, busy: set[int]) -> int | None:
        """A shard no live claim holds and not done, now claimed; None when there is none."""
        done, newest = self.done(), self.claims()
        free = [i for i in range(n) if i not in done and i not in busy]
        for i in sorted(free, key=lambda i: f"{i:06d}" in newest):  # unclaimed ones first
            if self.claim(f"{i:06d}", newest.get(f"{i:06d}", 0)):
                return i
        return None

    def release(self, task: str) -> None:
        with self.lock:
            self.held.pop(task, None)

    def beat(self) -> None:
        """Renew the heartbeat of every claim held."""
        with self.lock:
            for path, body in self.held.values():
                body["heartbeat"] = time.time()
                paths.write_text(path, json.dumps(body))


def _heartbeats(board: Board, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            board.beat()
        except Exception as e:  # a blip in the network: the next beat tries again
            log.warning("heartbeat: %s", e)


def _join(root, key: str, shards: list[Shard], stale_after: float) -> Board:
    """The board of plan `key` under `root` (OUT.partial): the newest plan when it is `key`,
    else a new plan once the newest one is abandoned."""
    while True:
        numbers = [int(m.group(1)) for name in paths.listdir(root)
                   if (m := re.fullmatch(r"plan\.(\d{4,})\.json", name))]
        g = max(numbers, default=0)
        plan = _read_json(root / f"plan.{g:04d}.json") if g else None
        if plan is not None and plan["key"] == key:
            return Board(root / f"{g:04d}", stale_after)
        if plan is not None and _alive(Board(root / f"{g:04d}", stale_after), plan):
            raise DataError(
                f"{root}: workers ({plan['host']}:{plan['pid']} first) are tokenizing other "
                f"inputs into this store ({plan['shards']} shards, {plan['bytes']:,} bytes; "
                f"here {len(shards)}, {sum(s.size for s in shards):,}); give every worker the "
                f"same inputs (same sizes and modification times), tokenizer and --text-field")
        body = {"key": key, "shards": len(shards), "bytes": sum(s.size for s in shards),
                **_owner(), "created": time.time()}
        if paths.create_if_absent(root / f"plan.{g + 1:04d}.json", json.dumps(body)):
            if g:
                log.warning("%s: starting over: the build of other inputs there was abandoned",
                            root)
                paths.remove(root / f"{g:04d}", recursive=True)
            return Board(root / f"{g + 1:04d}", stale_after)


def _alive(board: Board, plan: dict) -> bool:
    """Whether a heartbeat of the plan's build (or its start) came within stale_after."""
    last = plan["created"]
    for task, g in board.claims().items():
        claim = _read_json(board._path(task, g))
        last = max(last, claim["heartbeat"] if claim else time.time())
    return time.time() - last <= board.stale_after


class _Inline:
    """An executor that runs each task as it is submitted (one worker process: this one)."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def _pool(workers: int):
    if workers == 1:
        return _Inline()
    context = multiprocessing.get_context("forkserver")  # see store.build_store
    context.set_forkserver_preload(["__main__", "phijax.data.store"])
    return ProcessPoolExecutor(workers, mp_context=context)


def build_store_shared(specs: list[str], tokenizer: Tokenizer, out, text_field: str = "text",
                       glob: str | None = None, workers: int | None = None,
                       stale_after: float = 600.0, poll: float = 10.0,
                       shard_bytes: int | None = None) -> paths.AnyPath:
    """Take part in building the store of `specs` at `out` with any number of other workers
    running this same call (see the module's docstring); returns once the store is complete."""
    out = paths.as_path(out)
    planned = plan_build(specs, tokenizer, out, text_field, glob, shard_bytes)
    if planned is None:
        return out
    shards, key = planned
    root = out.with_name(out.name + ".partial")
    board = _join(root, key, shards, stale_after)
    stop = threading.Event()
    beats = threading.Thread(target=_heartbeats, args=(board, min(60.0, stale_after / 4), stop),
                             daemon=True)
    beats.start()
    try:
        mine, assembled = _work(board, shards, tokenizer, text_field, out, key,
                                max(1, workers or default_workers()), poll)
    finally:
        stop.set()
        beats.join()
    with contextlib.suppress(OSError):  # what is left: a file a slower worker wrote late
        paths.remove(root, recursive=True)
    log.info("store %s: this worker tokenized %d of %d shards%s", out, mine, len(shards),
             " and assembled the store" if assembled else "; another worker assembled the store")
    return out


def _work(board: Board, shards: list[Shard], tokenizer: Tokenizer, text_field: str, out, key,
          workers: int, poll: float) -> tuple[int, bool]:
    """Claim and tokenize shards until the store is built: (shards tokenized here, whether this
    worker assembled the store)."""
    n, pool, running, mine = len(shards), _pool(workers), {}, 0
    try:
        while not is_built(out, key):
            while len(running) < workers and \
                    (i := board.claim_shard(n, set(running.values()))) is not None:
                part = str(board.parts / f"{i:06d}")
                running[pool.submit(_tokenize_shard, shards[i], str(tokenizer.path),
                                    text_field, part)] = i
            if running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    tokens = future.result()["tokens"]
                    i = running.pop(future)
                    board.release(f"{i:06d}")
                    mine += 1
                    log.info("store %s: shard %d tokenized (%d tokens); %d of %d done", out, i,
                             tokens, len(board.done()), n)
            elif len(board.done()) == n and \
                    board.claim(ASSEMBLE, board.claims().get(ASSEMBLE, 0)):
                return mine, _assemble_claimed(board, out, n, tokenizer, key)
            else:  # the other shards are in flight elsewhere: look again later
                time.sleep(poll)
    finally:
        pool.shutdown(wait=True)
    return mine, False


def _assemble_claimed(board: Board, out, n: int, tokenizer: Tokenizer, key: str) -> bool:
    """Write the store under the assembly claim just made; False when another worker had
    written it already (and removed the parts)."""
    in_bucket = paths.is_url(out)
    new = paths.as_path(tempfile.mkdtemp(prefix="phijax-store-")) if in_bucket else \
        board.dir / f"store-{socket.gethostname()}-{os.getpid()}"  # renamed to OUT: its disk
    try:
        if is_built(out, key):
            return False
        _assemble(board.parts, new, out, n, tokenizer, key, f"store {out}")
        return True
    finally:
        if in_bucket:
            shutil.rmtree(new, ignore_errors=True)
        board.release(ASSEMBLE)
