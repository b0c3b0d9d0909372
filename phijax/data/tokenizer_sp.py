"""The sentencepiece BPE tokenizer: byte fallback, chat specials, a padded vocabulary, phi-4's
chat format, and its export as a Hugging Face tokenizer.json.

The vocabulary is padded like phi-4's (100,352 = 100,265 real entries rounded up to a multiple
of 128): after training, unused `<|dummy_N|>` pieces are appended to the model until its size is
a multiple of `multiple`. Unused pieces are never produced by encoding.

The export (`hf_files`) is a `tokenizers` BPE with the same vocabulary, merges ranked by
the score of the piece they make (sentencepiece merges the adjacent pair making the
highest-scoring piece), spaces written as "▁", byte fallback, and the user-defined specials as
added tokens; it encodes to the same ids as sentencepiece.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from phijax import paths
from phijax.data.chat import EOS, IM_END, PAD, PHI4_TEMPLATE, SPECIALS, render_phi4
from phijax.data.tokenizer_base import (HF_FILE, SP_FILE, Tokenizer, tokenizer_file,
                                         tokenizers_library)
from phijax.errors import ConfigError, DataError
from phijax.hashing import file_sha256

Piece = model_pb2.ModelProto.SentencePiece


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
        proto.pieces.add(piece=f"<|dummy_{i}|>", score=0.0, type=Piece.UNUSED)
    return proto.SerializeToString()


def train_tokenizer(docs: Iterable[str], out: str | Path, vocab_size: int, multiple: int = 128,
                    sample_bytes: int = 20_000_000) -> Path:
    """Train a BPE model of `vocab_size` pieces on (a sample of) `docs`, pad it to a multiple of
    `multiple`; writes OUT.model (OUT may be a gs:// or s3:// URL) and returns its path."""
    if vocab_size < 300:
        raise ConfigError(f"--vocab-size {vocab_size}: needs at least 300 (256 byte pieces, the "
                         f"specials and some merges)")
    if multiple < 1:
        raise ConfigError(f"--multiple {multiple}: must be at least 1")
    out = paths.as_path(out)
    if not paths.is_url(out):
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
    paths.write_bytes(path, _pad_model(model.getvalue(), multiple))
    return path


class SentencePieceTokenizer(Tokenizer, kind="sentencepiece"):
    """A sentencepiece `.model` trained by `train_tokenizer` (it holds the phi-4 specials);
    chats use phi-4's chat format."""

    def __init__(self, path: str | Path):
        _, path = tokenizer_file(path)
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"tokenizer {path}: not a sentencepiece model ({e})") from None
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

    def files(self) -> dict[str, Path]:
        return {SP_FILE: self.path}

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like `encode`, as int32 arrays straight from sentencepiece's buffers (no int lists)."""
        return self.sp.encode(texts, return_type="numpy", num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_bytes(self, i: int) -> bytes:
        """b"" for control and unused pieces."""
        sp = self.sp
        if sp.is_byte(i):
            return bytes([int(sp.id_to_piece(i)[1:-1], 16)])
        if sp.is_control(i) or sp.is_unused(i):
            return b""
        if sp.is_unknown(i):
            return sp.decode([i]).encode()
        return sp.id_to_piece(i).replace("\u2581", " ").encode()

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_phi4(messages, add_generation_prompt)

    @property
    def chat_template(self) -> str:
        return PHI4_TEMPLATE

    def encode_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Character offsets from sentencepiece's byte offsets: a piece holding part of a
        character (byte fallback) spans that whole character."""
        pieces = self.sp.encode(text, return_type="proto").pieces
        starts = np.cumsum([0] + [len(c.encode()) for c in text])  # each char's first byte
        byte_offsets = np.array([[p.begin, p.end] for p in pieces], np.int64).reshape(-1, 2)
        return [p.id for p in pieces], np.stack(
            [np.searchsorted(starts, byte_offsets[:, 0], side="right") - 1,
             np.searchsorted(starts, byte_offsets[:, 1], side="left")], axis=1)

    def hf_specials(self) -> dict[str, str | None]:
        """phi-4's: <|endoftext|> begins, <|im_end|> ends (a chat reply), <|pad|> pads."""
        return {"bos_token": EOS, "eos_token": IM_END, "pad_token": PAD,
                "unk_token": self.sp.id_to_piece(self.sp.unk_id())}

    def hf_files(self) -> dict[str, bytes]:
        """tokenizer.json (see the module's docstring), and a tokenizer_config.json naming
        phi-4's chat template and specials, as a Hugging Face model directory holds them."""
        proto = model_pb2.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        specials = self.hf_specials()
        added = {str(i): {"content": p.piece, "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False, "special": True}
                 for i, p in enumerate(proto.pieces) if p.type == Piece.USER_DEFINED}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                  "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "chat_template": PHI4_TEMPLATE,
                  "added_tokens_decoder": added}
        return {HF_FILE: _hf_backend(proto, self.path).to_str(pretty=True).encode(),
                "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
                "special_tokens_map.json": (json.dumps(specials, indent=2) + "\n").encode()}


def _hf_backend(proto, path: Path):
    """`proto` as a `tokenizers` BPE that encodes to the same ids (see the module's docstring);
    DataError for a model trained with other settings than `train_tokenizer`'s."""
    n, t = proto.normalizer_spec, proto.trainer_spec
    if (t.model_type != t.BPE or not t.byte_fallback or n.add_dummy_prefix
            or n.remove_extra_whitespaces or not n.escape_whitespaces or n.precompiled_charsmap):
        raise DataError(f"tokenizer {path}: only a BPE model trained like `phijax tokenizer "
                        f"train`'s (byte fallback, identity normalization, no dummy prefix) "
                        f"exports as a tokenizer.json")
    tk = tokenizers_library(f"exporting tokenizer {path} as a tokenizer.json")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == Piece.NORMAL}
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    backend = tk.Tokenizer(tk.models.BPE(
        vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], byte_fallback=True,
        unk_token=proto.trainer_spec.unk_piece, fuse_unk=True))
    backend.normalizer = tk.normalizers.Replace(" ", "\u2581")
    backend.decoder = tk.decoders.Sequence([tk.decoders.Replace("\u2581", " "),
                                            tk.decoders.ByteFallback(), tk.decoders.Fuse()])
    backend.add_special_tokens([tk.AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type == Piece.USER_DEFINED])
    return backend
