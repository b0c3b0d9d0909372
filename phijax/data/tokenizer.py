"""The sentencepiece BPE tokenizer: byte fallback, chat specials, a padded vocabulary, and the
phi-4 chat template with its assistant-only loss mask.

The vocabulary is padded like phi-4's (100,352 = 100,265 real entries rounded up to a multiple
of 128): after training, unused `<|dummy_N|>` pieces are appended to the model until its size is
a multiple of `multiple`. Unused pieces are never produced by encoding.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from phijax.errors import ConfigError, DataError
from phijax.files import atomic_write
from phijax.hashing import file_sha256

EOS, IM_START, IM_SEP, IM_END, PAD = ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>",
                                      "<|pad|>")
SPECIALS = (EOS, IM_START, IM_SEP, IM_END, PAD)
ROLES = ("system", "user", "assistant")


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    return -(-n // multiple) * multiple


def _lines(docs: Iterable[str], max_bytes: int) -> Iterable[str]:
    total = 0
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            if line:
                total += len(line)
                yield line[:4000]
                if total >= max_bytes:
                    return


def _pad_model(data: bytes, multiple: int) -> bytes:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(data)
    n = len(proto.pieces)
    for i in range(padded_vocab_size(n, multiple) - n):
        proto.pieces.add(piece=f"<|dummy_{i}|>", score=0.0,
                         type=model_pb2.ModelProto.SentencePiece.UNUSED)
    return proto.SerializeToString()


def train_tokenizer(docs: Iterable[str], out: str | Path, vocab_size: int, multiple: int = 128,
                    sample_bytes: int = 20_000_000) -> Path:
    """Train a BPE model of `vocab_size` pieces on (a sample of) `docs`, pad it to a multiple of
    `multiple`; writes OUT.model and returns its path."""
    if vocab_size < 300:
        raise ConfigError(f"--vocab-size {vocab_size}: needs at least 300 (256 byte pieces, the "
                         f"specials and some merges)")
    if multiple < 1:
        raise ConfigError(f"--multiple {multiple}: must be at least 1")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    logging.getLogger("sentencepiece").setLevel(logging.WARNING)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_lines(docs, sample_bytes)), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            character_coverage=0.9995, user_defined_symbols=list(SPECIALS), unk_id=0, bos_id=-1,
            eos_id=-1, pad_id=-1, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            normalization_rule_name="identity", minloglevel=2)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (1024). Please set it to <= 324."
        raise ConfigError(f"tokenizer vocabulary size {vocab_size}: "
                         f"{str(e).split('] ')[-1].strip()}") from None
    path = out.with_suffix(".model")
    atomic_write(path, _pad_model(model.getvalue(), multiple))
    return path


def render_chat(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """phi-4's chat format as text, and the byte spans the loss is on (assistant replies, each
    with its closing <|im_end|>)."""
    parts, spans, size = [], [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}{IM_SEP}"
        body = f"{m['content']}{IM_END}"
        size += len(head.encode())
        if m["role"] == "assistant":
            spans.append((size, size + len(body.encode())))
        size += len(body.encode())
        parts += [head, body]
    return "".join(parts), spans


def chat_error(messages) -> str | None:
    """Why `messages` is not a chat the template can render, or None."""
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "a message has no string content"
        if m.get("role") not in ROLES:
            return f"a message role is not one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "messages has no assistant reply"
    return None


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer {path} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        missing = [s for s in SPECIALS if self.sp.piece_to_id(s) == self.sp.unk_id()]
        if missing:
            raise DataError(f"tokenizer {path} lacks the specials {', '.join(missing)}; "
                             f"retrain it with `phijax tokenizer train`")
        self.eos_id = self.sp.piece_to_id(EOS)
        self.pad_id = self.sp.piece_to_id(PAD)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def hash(self) -> str:
        return file_sha256(self.path)[:16]

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like `encode`, as int32 arrays straight from sentencepiece's buffers (no int lists)."""
        return self.sp.encode(texts, return_type="numpy", num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for in decoded text (b"" for control and unused pieces);
        a token may hold part of a UTF-8 character."""
        sp = self.sp
        if sp.is_byte(i):
            return bytes([int(sp.id_to_piece(i)[1:-1], 16)])
        if sp.is_control(i) or sp.is_unused(i):
            return b""
        if sp.is_unknown(i):
            return sp.decode([i]).encode()
        return sp.id_to_piece(i).replace("\u2581", " ").encode()

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered chat followed by an open assistant turn: what a model
        trained on `encode_chat` continues with its reply (ending in <|im_end|>)."""
        text, _ = render_chat(messages)
        return self.sp.encode(text + f"{IM_START}assistant{IM_SEP}")

    @property
    def im_end_id(self) -> int:
        return self.sp.piece_to_id(IM_END)

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Where a chat reply ends: <|im_end|>, or <|endoftext|>."""
        return (self.im_end_id, self.eos_id)

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], np.ndarray]:
        """Token ids of the rendered chat and a 0/1 loss mask, on for assistant tokens only.

        The whole rendering is encoded at once, so the ids are exactly what encoding the same
        text at inference gives; the mask comes from each piece's byte offset.
        """
        text, spans = render_chat(messages)
        pieces = self.sp.encode(text, return_type="proto").pieces
        ids = [p.id for p in pieces]
        begin = np.array([p.begin for p in pieces], np.int64)
        mask = np.zeros(len(ids), np.uint8)
        for lo, hi in spans:
            mask[(begin >= lo) & (begin < hi)] = 1
        return ids, mask
