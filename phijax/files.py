"""Files written whole or not at all, and JSONL read and written one way everywhere.

A file written through `replacing` (or `atomic_open`, `atomic_write`, `write_jsonl`) goes to a
temporary file beside it, is flushed and fsynced, then renamed over the target: a reader (or a
run killed at any instant) sees the old file or the whole new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Iterable, Iterator

from etils import epath

from phijax.errors import ConfigError, DataError


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to; on success it is fsynced and
    renamed over `path`, on error removed (the old file stays as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """`open(path, mode)` for writing, replacing `path` atomically when the block ends."""
    with replacing(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; DataError naming `file:line` for a line
    that is not a JSON object. `path`: a local path, or a path object with pathlib's methods
    (`phijax.paths.as_path` of a bucket's URL), or a gs:// / s3:// URL."""
    if isinstance(path, str):
        path = epath.Path(path) if path.startswith(("gs://", "s3://")) else Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise DataError(f"{path}:{lineno}: invalid JSON ({why})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def read_text_records(path: str | Path, text_field: str, required: tuple[str, ...] = (),
                      nullable: bool = False) -> list[dict]:
    """The records of a JSONL file, each holding a string `text_field` (or null, when
    `nullable`) and the `required` fields; DataError naming `file:line` for the first that
    does not."""
    out = []
    for lineno, rec in read_jsonl(path):
        for name in (text_field, *required):
            if name not in rec:
                raise DataError(f"{path}:{lineno}: no field {name!r}")
        if not isinstance(rec[text_field], str) and not (nullable and rec[text_field] is None):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
        out.append(rec)
    return out


def jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write `rows` as JSONL atomically; a row that fails to serialize leaves the old file."""
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(jsonl_line(row))
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as a PNG at `path` (its folder made) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
