"""Token stores: TensorStore arrays of token ids and document offsets, plus a manifest.

A store directory holds
  tokens/         zarr3 uint32 [tokens]      every document's ids, each ending in <|endoftext|>
  offsets/        zarr3 int64  [documents+1] document starts, then the end
  loss_mask/      zarr3 uint8  [tokens]      only when the store holds chats: 1 on assistant tokens
  metadata.jsonl  one line per document ({"path": ...} for files of a tree), when any has some
  manifest.json   documents, tokens, the tokenizer (path and hash), the largest token id
                  (`max_id`), skipped records by reason and examples

`build_store` tokenizes shards (see corpus.py) in worker processes on every core. Each finished
shard is kept as a part file under OUT.partial/parts, written atomically, so a rerun after a crash
or a kill tokenizes only the shards that were not done. The arrays are then assembled in shard
order (the store does not depend on how many workers ran) and renamed into place; an existing
store is replaced only once the new one is complete.

OUT may be a gs:// or s3:// URL: the part files then stay in a local temporary directory, and
the arrays are written straight into the bucket (which has no rename), manifest.json last: until
it is there the URL is not a store. Reads of a store in a bucket are ranged reads of its objects.

`phijax data tokenize --shared` builds one store with workers on many machines instead
(store_workers.py), from the same part files and assembly.

`TokenStore.select(n)` gives a store's documents of at least n tokens as a store of their own
(`DocumentSubset`), from the offsets alone: nothing is tokenized again.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from phijax import paths
from phijax.data.corpus import Shard, Skipped, plan_shards, read_shard
from phijax.data.tokenizer import Tokenizer, load_tokenizer
from phijax.errors import DataError
from phijax.files import atomic_open, atomic_write, jsonl_line
from phijax.hashing import digest

log = logging.getLogger("phijax")
FORMAT = "phijax-store-1"
SHARD = 1 << 22  # elements per zarr shard (one file)
CHUNK = 1 << 14  # elements per inner chunk (the unit a read fetches)


def _array_spec(path: Path, dtype: str | None = None, size: int | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": paths.kvstore(path)}
    if size is not None:
        bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
        spec["metadata"] = {
            "shape": [size], "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [CHUNK], "codecs": [bytes_codec],
                "index_codecs": [bytes_codec, {"name": "crc32c"}]}}]}
    return spec


class _Column:
    """Appends to a new 1-D array, writing whole zarr shards at a time."""

    def __init__(self, path: Path, dtype: str, size: int):
        self.array = ts.open(_array_spec(path, dtype, size), create=True).result()
        self.buffer, self.pos, self.dtype = [], 0, np.dtype(dtype)

    def append(self, values: np.ndarray, final: bool = False) -> None:
        self.buffer.append(np.asarray(values, self.dtype))
        pending = sum(b.size for b in self.buffer)
        if pending >= SHARD or final:
            data = np.concatenate(self.buffer)
            cut = data.size if final else data.size - data.size % SHARD
            if cut:
                self.array[self.pos:self.pos + cut].write(data[:cut]).result()
            self.buffer, self.pos = [data[cut:]], self.pos + cut


_worker_tokenizers: dict = {}


def _tokenize_shard(shard: Shard, tokenizer_path: str, text_field: str, part: str) -> dict:
    """Tokenize one shard into PART.npz (+ PART.json, written last: the shard is done)."""
    tokenizer = _worker_tokenizers.get(tokenizer_path)
    if tokenizer is None:
        tokenizer = _worker_tokenizers[tokenizer_path] = load_tokenizer(tokenizer_path)
    skipped = Skipped()
    docs = list(read_shard(shard, text_field, skipped))
    texts = [d.text for d in docs if d.messages is None]
    encoded = iter(tokenizer.encode_arrays(texts) if texts else [])
    eos = np.array([tokenizer.eos_id], np.int32)
    pieces, lengths, masks, doc_paths, chats = [], [], {}, [], 0
    for k, doc in enumerate(docs):
        if doc.messages is None:
            ids = next(encoded)
        else:
            ids, mask = tokenizer.encode_chat(doc.messages)
            masks[k] = np.append(mask, np.uint8(0))  # no loss on the closing <|endoftext|>
            chats += 1
        pieces += [np.asarray(ids, np.int32), eos]
        lengths.append(len(ids) + 1)
        doc_paths.append(doc.path)
    lengths = np.array(lengths, np.int64)
    tokens = np.concatenate(pieces).astype(np.uint32) if pieces else np.zeros(0, np.uint32)
    mask = np.zeros(0, np.uint8)
    if chats:  # text documents in a store with chats train on every token
        mask = np.concatenate([masks.get(k, np.ones(n, np.uint8)) for k, n in enumerate(lengths)])
    _save_part(part + ".npz", tokens=tokens, lengths=lengths, mask=mask)
    summary = {"documents": len(docs), "tokens": int(lengths.sum()), "chats": chats,
               "skipped": {"counts": skipped.counts, "examples": skipped.examples},
               "paths": doc_paths if any(p is not None for p in doc_paths) else None}
    paths.write_text(part + ".json", json.dumps(summary))
    return summary


def _save_part(path: str, **arrays) -> None:
    """An .npz written whole: locally through a temporary file, on a bucket as one object."""
    if not paths.is_url(path):
        with atomic_open(path) as f:
            np.savez(f, **arrays)
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    paths.write_bytes(path, buffer.getvalue())


def _load_part(path) -> dict[str, np.ndarray]:
    source = io.BytesIO(paths.read_bytes(path)) if paths.is_url(path) else path
    with np.load(source) as part:
        return {name: part[name] for name in part.files}


def _plan_key(shards: list[Shard], tokenizer: Tokenizer, text_field: str) -> str:
    stamp = []
    for s in shards:
        stamp.append(s.to_dict())
        stamp.append([paths.stamp(p) for p in s.paths])
    return digest(FORMAT, tokenizer.hash, text_field, stamp)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def plan_build(specs: list[str], tokenizer: Tokenizer, out, text_field: str, glob: str | None,
               shard_bytes: int | None, what: str | None = None) -> tuple[list, str] | None:
    """(shards, plan key) of building `specs` into `out`; None when `out` already holds that
    store (then it is brought up to date in place)."""
    shards = plan_shards(specs, glob, shard_bytes)
    if not shards:
        raise DataError(f"{what or f'store {out}'}: {' '.join(specs)} holds no documents")
    key = _plan_key(shards, tokenizer, text_field)
    if is_built(out, key):
        log.info("store %s is up to date", out)
        _add_max_id(out)
        return None
    return shards, key


def build_store(specs: list[str], tokenizer: Tokenizer, out: str | Path, text_field: str = "text",
                glob: str | None = None, workers: int | None = None,
                shard_bytes: int | None = None, what: str | None = None) -> Path:
    """Tokenize `specs` into a store at `out`, resuming from the shards a killed run finished.
    `what` names the store in errors (default `store OUT`)."""
    out = paths.as_path(out)
    desc = f"tokenize {what or out.name}"
    planned = plan_build(specs, tokenizer, out, text_field, glob, shard_bytes, what)
    if planned is None:
        return out
    shards, key = planned
    what = what or f"store {out}"
    work = _work_dir(out)
    parts = work / "parts"
    if not (work / "plan.json").is_file() or json.loads((work / "plan.json").read_text()) != key:
        shutil.rmtree(work, ignore_errors=True)
        parts.mkdir(parents=True)
        atomic_write(work / "plan.json", json.dumps(key))
    done = {i for i in range(len(shards)) if (parts / f"{i:06d}.json").is_file()}
    todo = [i for i in range(len(shards)) if i not in done]
    if done:
        log.info("store %s: resuming, %d of %d shards already tokenized", out, len(done),
                 len(shards))
    workers = max(1, min(workers or default_workers(), len(todo)))
    bar = tqdm(total=sum(s.size for s in shards), initial=sum(shards[i].size for i in done),
               unit="B", unit_scale=True, desc=desc, mininterval=2.0)
    tokens, t0 = 0, time.perf_counter()

    def finished(i: int, summary: dict) -> None:
        nonlocal tokens
        tokens += summary["tokens"]
        bar.update(shards[i].size)
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tok/s", refresh=False)

    args = lambda i: (shards[i], str(tokenizer.path), text_field, str(parts / f"{i:06d}"))
    if workers == 1:
        for i in todo:
            finished(i, _tokenize_shard(*args(i)))
    else:
        # forkserver, not fork: the caller may already run JAX's threads. Workers fork from a
        # server that has imported this module once.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_tokenize_shard, *args(i)): i for i in todo}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    bar.close()
    _assemble(parts, work / "store", out, len(shards), tokenizer, key, what)
    shutil.rmtree(work, ignore_errors=True)
    return out


def is_built(out, key: str) -> bool:
    """Whether `out` holds the complete store of the plan `key`."""
    try:
        return json.loads(paths.read_text(out / "manifest.json")).get("plan") == key
    except (FileNotFoundError, NotADirectoryError):
        return False


def _work_dir(out) -> Path:
    """Where the part files of `out` go: OUT.partial beside it, or for a bucket a local
    temporary directory named after the URL (a rerun on this machine resumes from it)."""
    if not paths.is_url(out):
        return out.with_name(out.name + ".partial")
    return Path(tempfile.gettempdir()) / "phijax-tokenize" / \
        f"{out.name}-{digest(str(out), length=12)}.partial"


def _assemble(parts, new: Path, out, n: int, tokenizer: Tokenizer, key: str, what: str) -> None:
    """Write the store of the `n` parts in `parts` (a local path or a URL) to `out`, through
    `new`, a local directory for the files written whole (all of the store for a local `out`,
    renamed into place at the end; it must be on `out`'s file system)."""
    summaries = [json.loads(paths.read_text(parts / f"{i:06d}.json")) for i in range(n)]
    documents = sum(s["documents"] for s in summaries)
    total = sum(s["tokens"] for s in summaries)
    chats = sum(s["chats"] for s in summaries)
    if not documents:
        raise DataError(f"{what}: the corpus produced no documents")
    skipped = Skipped()
    for s in summaries:
        skipped.merge(s["skipped"])
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    arrays = out if paths.is_url(out) else new  # a bucket has no rename: written in place
    if paths.is_url(out):
        paths.remove(out / "manifest.json")  # not a store from here until its new manifest
        paths.remove(out, recursive=True)
    columns = {"tokens": _Column(arrays / "tokens", "uint32", total)}
    if chats:
        columns["mask"] = _Column(arrays / "loss_mask", "uint8", total)
    lengths, max_id = [], -1
    for i in range(n):
        part = _load_part(parts / f"{i:06d}.npz")
        columns["tokens"].append(part["tokens"])
        if part["tokens"].size:
            max_id = max(max_id, int(part["tokens"].max()))
        if chats:  # a shard without chats trains on every token
            columns["mask"].append(part["mask"] if part["mask"].size
                                   else np.ones(part["tokens"].size, np.uint8))
        lengths.append(part["lengths"])
    for column in columns.values():
        column.append(np.zeros(0), final=True)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
    _Column(arrays / "offsets", "int64", offsets.size).append(offsets, final=True)
    if any(s["paths"] for s in summaries):
        with open(new / "metadata.jsonl", "w") as f:
            for s in summaries:
                for p in s["paths"] or [None] * s["documents"]:
                    f.write(jsonl_line({"path": p} if p is not None else {}))
    manifest = {"format": FORMAT, "documents": documents, "tokens": total,
                "chat_documents": chats, "tokenizer": str(tokenizer.path),
                "tokenizer_hash": tokenizer.hash, "max_id": max_id, "skipped": skipped.counts,
                "skipped_examples": skipped.examples, "plan": key}
    (new / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if paths.is_url(out):
        for name in ("metadata.jsonl", "manifest.json"):  # the manifest last
            if (new / name).is_file():
                paths.upload(new / name, out / name)
        return
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _add_max_id(path: Path) -> None:
    """Write `max_id` into the manifest of a store built before manifests had it."""
    manifest = json.loads(paths.read_text(path / "manifest.json"))
    if "max_id" not in manifest:
        manifest["max_id"] = TokenStore(path).max_id
        paths.write_text(path / "manifest.json", json.dumps(manifest, indent=2))


_context = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


class TokenStore:
    """Read access to a store: `read` token ranges, `offsets` in memory. `what` names the store
    in errors (default `token store PATH`)."""

    def __init__(self, path: str | Path, what: str | None = None):
        path = paths.as_path(path)
        what = what or f"token store {path}"
        if not paths.exists(path / "manifest.json"):
            state = "is not a token store" if paths.exists(path) else "does not exist"
            hint = "; its tokenizing did not finish (rerun `phijax data tokenize` to resume it)" \
                if _work_dir(path).is_dir() else ""
            raise DataError(f"{what} {state} (no manifest.json){hint}")
        self.path = path
        self.manifest = json.loads(paths.read_text(path / "manifest.json"))
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{what} is not a {FORMAT} store; rebuild it with "
                             f"`phijax data tokenize`")
        self.tokens = ts.open(_array_spec(path / "tokens"), context=_context).result()
        self.offsets = ts.open(_array_spec(path / "offsets")).result().read().result()
        self.loss_mask = (ts.open(_array_spec(path / "loss_mask"), context=_context).result()
                          if self.manifest["chat_documents"] else None)

    def __len__(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def documents(self) -> int:
        return int(self.manifest["documents"])

    @property
    def max_id(self) -> int:
        """The largest token id in the store (-1 when empty); read from the tokens, a shard at
        a time, for a store whose manifest predates `max_id`."""
        if "max_id" not in self.manifest:
            n = len(self)
            log.info("token store %s: finding its largest token id (%d tokens)", self.path, n)
            largest = (int(self.read(i, min(i + SHARD, n)).max()) for i in range(0, n, SHARD))
            self.manifest["max_id"] = max(largest, default=-1)
        return int(self.manifest["max_id"])

    def read(self, begin: int, end: int) -> np.ndarray:
        return self.tokens[begin:end].read().result().astype(np.int32)

    def read_mask(self, begin: int, end: int) -> np.ndarray | None:
        return None if self.loss_mask is None else self.loss_mask[begin:end].read().result()

    def select(self, min_tokens: int | None) -> "TokenStore | DocumentSubset":
        """The documents of at least `min_tokens` tokens (each counted with its closing
        <|endoftext|>), found from the offsets alone; None: the whole store."""
        if not min_tokens:
            return self
        return DocumentSubset(self, np.flatnonzero(np.diff(self.offsets) >= min_tokens))


class DocumentSubset:
    """Some documents of a store, read as a store of their own: their tokens back to back in
    store order, with their own `offsets`, so `Windows` and `PackedDocuments` draw from them
    alone. A read spans runs of consecutive documents with one store read per run."""

    def __init__(self, store: TokenStore, documents: np.ndarray):
        self.store, self.path = store, store.path
        lengths = np.diff(store.offsets)[documents]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        starts_run = np.ones(documents.size, bool)
        starts_run[1:] = np.diff(documents) != 1
        self._run_begin = self.offsets[:-1][starts_run]  # where each run starts here
        self._run_source = store.offsets[documents[starts_run]]  # and in the store

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def documents(self) -> int:
        return self.offsets.size - 1

    def _spans(self, begin: int, end: int):
        """The store ranges that hold tokens [begin, end) of the subset."""
        run = int(np.searchsorted(self._run_begin, begin, side="right")) - 1
        while begin < end:
            stop = int(self._run_begin[run + 1]) if run + 1 < self._run_begin.size else len(self)
            take = min(end, stop)
            first = int(self._run_source[run]) + begin - int(self._run_begin[run])
            yield first, first + take - begin
            begin, run = take, run + 1

    def read(self, begin: int, end: int) -> np.ndarray:
        return np.concatenate([self.store.read(a, b) for a, b in self._spans(begin, end)] or
                              [np.zeros(0, np.int32)])

    def read_mask(self, begin: int, end: int) -> np.ndarray | None:
        if self.store.loss_mask is None:
            return None
        return np.concatenate([self.store.read_mask(a, b) for a, b in self._spans(begin, end)] or
                              [np.zeros(0, np.uint8)])
