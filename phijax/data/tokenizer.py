"""The sentencepiece BPE tokenizer: byte fallback, chat specials, vocabulary padded for the model."""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|dummy_pad|>")


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


def train_tokenizer(docs: Iterable[str], out: str | Path, vocab_size: int,
                    sample_bytes: int = 20_000_000) -> Path:
    """Train a BPE model on (a sample of) `docs`; writes OUT.model and returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    logging.getLogger("sentencepiece").setLevel(logging.WARNING)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines(docs, sample_bytes)), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
        user_defined_symbols=list(SPECIALS), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    path = out.with_suffix(".model")
    tmp = path.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer {path} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.eos_id = self.sp.piece_to_id("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
