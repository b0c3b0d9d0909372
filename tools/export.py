"""Pipeline records -> chat JSONL for `phijax.data.store.build_store`.

Each record with a non-empty instruction and response becomes
`{"id": ..., "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` (with a system
message first when `system` is given); others are skipped and counted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from phijax.files import write_jsonl


def to_chat(record: dict, instruction_field: str = "instruction",
            response_field: str = "response", system: Optional[str] = None) -> Optional[dict]:
    """The chat form of one record, or None when either field is missing or empty."""
    inst, resp = record.get(instruction_field), record.get(response_field)
    if not (isinstance(inst, str) and inst.strip() and isinstance(resp, str) and resp.strip()):
        return None
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": inst}, {"role": "assistant", "content": resp}]
    return {"id": record.get("id"), "messages": messages}


def write_chat_jsonl(records: Iterable[dict], out: str | Path, **kw) -> tuple[int, int]:
    """Write the chat form of `records` to `out` (atomically); returns (written, skipped)."""
    counts = {"written": 0, "skipped": 0}

    def chats():
        for rec in records:
            chat = to_chat(rec, **kw)
            counts["skipped" if chat is None else "written"] += 1
            if chat is not None:
                yield chat
    write_jsonl(out, chats())
    return counts["written"], counts["skipped"]
