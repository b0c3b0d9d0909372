"""Pipeline records -> chat JSONL for `phijax.data.store.build_store` (DESIGN.md §1, §2).

Each record with a non-empty instruction and response becomes
`{"id": ..., "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` (with a system
message first when `system` is given); others are skipped and counted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["to_chat", "write_chat_jsonl"]


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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    written = skipped = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            chat = to_chat(rec, **kw)
            if chat is None:
                skipped += 1
                continue
            f.write(json.dumps(chat, ensure_ascii=False) + "\n")
            written += 1
    tmp.replace(out)
    return written, skipped
