"""Hugging Face tokenizers: a `tokenizer.json` read with the `tokenizers` library, with the
specials and chat template of the tokenizer_config.json beside it.

phi-4 ships a tiktoken-style byte-level BPE this way (its model pads the vocabulary to 100,352).
The files read from the tokenizer's directory: tokenizer.json (or the .json file given),
tokenizer_config.json (`chat_template`, `bos_token`, `eos_token`, `pad_token`, `unk_token`),
special_tokens_map.json (specials the config does not name), and chat_template.jinja or
chat_template.json (where newer transformers keep the template).

Ids: `eos_id` (the end of a document) is `<|endoftext|>` where the vocabulary has it, else the
config's eos_token; `pad_id` the config's pad_token, else `<|pad|>`, else `eos_id`. Text is
encoded without the post-processor's specials (a chat template writes its own), as transformers'
`apply_chat_template` does; decoding keeps special tokens. A tokenizer with no chat template whose
vocabulary has phi-4's chat specials renders chats in phi-4's format.
"""
from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import numpy as np

from phijax.data.chat import EOS, PAD, PHI4_TEMPLATE, SPECIALS, compile_template, render_phi4
from phijax.data.tokenizer_base import (CONFIG, HF_FILE, SPECIALS_MAP, TEMPLATE_FILES, Tokenizer,
                                        tokenizer_file, tokenizers_library)
from phijax.errors import DataError
from phijax.hashing import digest, file_sha256

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a JSON object")
    return value


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + k): b for k, b in enumerate(moved)}}


def _types(spec) -> list[dict]:
    """Every component of a tokenizer.json decoder (Sequence decoders flattened)."""
    if not isinstance(spec, dict):
        return []
    return [spec] + [t for d in spec.get("decoders") or [] for t in _types(d)]


def _template_source(folder: Path, config: dict) -> tuple[str | None, Path]:
    """A tokenizer's chat template and the file holding it: tokenizer_config.json's
    `chat_template` (a string, or the "default" of a list of named templates), else
    chat_template.jinja, else chat_template.json's `chat_template`."""
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source
                       if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(source, str) and source:
        return source, folder / CONFIG
    jinja, in_json = (folder / name for name in TEMPLATE_FILES)
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja
    source = _read_json(in_json).get("chat_template")
    return (source if isinstance(source, str) else None), in_json


def hf_files_at(path: Path) -> dict[str, Path]:
    """The files of the tokenizer.json at `path`: name in a run directory -> file."""
    folder = path.parent
    out = {HF_FILE: path}
    out.update((name, folder / name) for name in (CONFIG, SPECIALS_MAP, *TEMPLATE_FILES)
               if (folder / name).is_file())
    return out


class HFTokenizer(Tokenizer, kind="hf"):
    """A `tokenizers` tokenizer.json with its tokenizer_config.json."""

    def __init__(self, path: str | Path):
        _, path = tokenizer_file(path)
        backend = tokenizers_library(f"tokenizer {path}").Tokenizer
        self.path, folder = path, path.parent
        try:
            text = path.read_text(encoding="utf-8")
            self.decoder_spec = json.loads(text).get("decoder")
            self.backend = backend.from_str(text)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise DataError(f"tokenizer {path}: not a tokenizers tokenizer.json "
                            f"({str(e).splitlines()[0][:120]})") from None
        self.config = _read_json(folder / CONFIG)
        named = _read_json(folder / SPECIALS_MAP)
        self.specials = {k: _token_text(self.config.get(k)) or _token_text(named.get(k))
                         for k in SPECIAL_NAMES}
        self.vocab = self.backend.get_vocab(with_added_tokens=True)
        eos = EOS if EOS in self.vocab else self.specials["eos_token"]
        if eos not in self.vocab:
            raise DataError(f"tokenizer {path}: no {EOS} token and no eos_token in {CONFIG} "
                            f"(the token that ends a document)")
        self.eos_id = self.vocab[eos]
        pad = next((t for t in (self.specials["pad_token"], PAD) if t in self.vocab), eos)
        self.pad_id = self.vocab[pad]

    @cached_property
    def _render(self):
        """The render function of the tokenizer's chat template (compiled on first use), or
        None."""
        source, where = _template_source(self.path.parent, self.config)
        if source:
            variables = {k: v for k, v in self.specials.items() if v is not None}
            return compile_template(source, variables, str(where))
        if all(s in self.vocab for s in SPECIALS[1:4]):
            return render_phi4
        return None

    @cached_property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def files(self) -> dict[str, Path]:
        return hf_files_at(self.path)

    @cached_property
    def hash(self) -> str:
        return digest(sorted((name, file_sha256(p)) for name, p in self.files().items()))

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """`num_threads` 1 encodes on this thread; any other number lets `tokenizers` use its
        thread pool."""
        if num_threads == 1:
            return [self.backend.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self.encode(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece_id(self, piece: str) -> int | None:
        return self.vocab.get(piece)

    @cached_property
    def _bytes(self) -> list[bytes]:
        """Each id's bytes, from the decoder tokenizer.json names: byte-level tokens map each
        character to a byte; otherwise "<0xNN>" pieces are bytes (byte fallback) and the
        decoder's Replace/Metaspace steps apply ("▁" -> " "); added tokens are their text."""
        parts = _types(self.decoder_spec)
        kinds = {p.get("type") for p in parts}
        replace = [(p["pattern"]["String"], p["content"]) for p in parts
                   if p.get("type") == "Replace" and "String" in (p.get("pattern") or {})]
        replace += [(p.get("replacement", "\u2581"), " ") for p in parts
                    if p.get("type") == "Metaspace"]
        added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
        table, byte_of = [b""] * self.vocab_size, _byte_decoder()
        for token, i in self.vocab.items():
            if i in added:
                table[i] = added[i].encode()
            elif "ByteLevel" in kinds:
                table[i] = bytes(byte_of[c] for c in token) if all(c in byte_of for c in token) \
                    else token.encode()
            elif "ByteFallback" in kinds and BYTE_PIECE.fullmatch(token):
                table[i] = bytes([int(token[3:5], 16)])
            elif replace or not kinds:
                for old, new in replace:
                    token = token.replace(old, new)
                table[i] = token.encode()
            else:
                table[i] = self.backend.decode([i], skip_special_tokens=False).encode()
        return table

    def token_bytes(self, i: int) -> bytes:
        """b"" for ids the vocabulary lacks (a padded vocabulary's gaps)."""
        return self._bytes[i] if 0 <= i < self.vocab_size else b""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self._render is None:
            raise DataError(f"tokenizer {self.path}: no chat_template in {CONFIG} (and no "
                            f"<|im_start|>/<|im_sep|>/<|im_end|> tokens for phi-4's format)")
        return self._render(messages, add_generation_prompt)

    @property
    def chat_template(self) -> str | None:
        source = _template_source(self.path.parent, self.config)[0]
        return source or (PHI4_TEMPLATE if self._render is render_phi4 else None)

    def encode_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, np.array(enc.offsets, np.int64).reshape(-1, 2)

    def hf_specials(self) -> dict[str, str | None]:
        """The specials its files name; eos and pad, where they name none, are the tokens
        phijax uses (<|endoftext|> ends a document): an export always has them set."""
        specials = dict(self.specials)
        for name, i in (("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if specials.get(name) is None:
                specials[name] = self.backend.id_to_token(i)
        return specials

    def hf_files(self) -> dict[str, bytes]:
        """The tokenizer's own files; a tokenizer_config.json naming its specials (and chat
        template) where it has none, so that AutoTokenizer knows its eos and pad."""
        files = {name: p.read_bytes() for name, p in self.files().items()}
        if CONFIG not in files:
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      **{k: v for k, v in self.hf_specials().items() if v is not None},
                      "clean_up_tokenization_spaces": False}
            if self.chat_template:
                config["chat_template"] = self.chat_template
            files[CONFIG] = (json.dumps(config, indent=2) + "\n").encode()
        return files
