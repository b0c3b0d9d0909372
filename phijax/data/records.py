"""What readers yield and what they count: `Record` (one document as read), `Skipped` (what could
not be read, by reason), and the helpers the readers share to open files and to find the next
gzip member, zstandard frame or WARC record after corrupt data."""
from __future__ import annotations

from dataclasses import dataclass, field

from phijax.errors import DataError

MAGIC = {"gzip": b"\x1f\x8b\x08", "zstandard": b"\x28\xb5\x2f\xfd", "warc": b"WARC/1."}


@dataclass
class Skipped:
    """Counts of skipped records by reason, and the first few named by id; `strict`: the first
    one raises DataError."""
    counts: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    strict: bool = False

    def add(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def merge(self, other: dict) -> None:
        for reason, n in other["counts"].items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        self.examples = (self.examples + other["examples"])[:5]

    def as_dict(self) -> dict:
        return {"counts": self.counts, "examples": self.examples}


@dataclass
class Record:
    """One document as read: its text, or its bytes and content type (HTML, PDF)."""
    id: str
    text: str | None = None
    raw: bytes | None = None
    content_type: str = "text/plain"
    metadata: dict = field(default_factory=dict)



def open_file(path: str, skipped: Skipped):
    """The file (or gs:// / s3:// object) open for reading, or None counted in `skipped`."""
    from phijax.paths import open_read
    try:
        return open_read(path)
    except OSError as e:
        return skipped.add(f"cannot open ({e.strerror or e})", path)


def resync(f, after: int, magic: bytes) -> int | None:
    """The offset of the first `magic` past byte `after`, or None; leaves `f` there."""
    pos = after + 1
    f.seek(pos)
    tail = b""
    while True:
        block = f.read(1 << 20)
        if not block:
            return None
        hit = (tail + block).find(magic)
        if hit >= 0:
            f.seek(pos - len(tail) + hit)
            return f.tell()
        tail = block[-(len(magic) - 1):]
        pos += len(block)
