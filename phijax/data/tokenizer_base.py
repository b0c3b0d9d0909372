"""The tokenizer interface every part of phijax uses, whichever implementation is behind it.

`Tokenizer(path)` picks the implementation from the path (see `tokenizer_file`): a sentencepiece
`.model` (phijax/data/tokenizer_sp.py) or a Hugging Face `tokenizer.json` read with the
`tokenizers` library (phijax/data/tokenizer_hf.py). Implementations register themselves by
subclassing with a `kind`; `phijax.data.tokenizer` imports both.

Ids: `eos_id` ends every document of a token store (`<|endoftext|>` where the vocabulary has
it), `pad_id` fills packed rows, `stop_ids` end a chat reply. The chat methods render messages
with the tokenizer's chat template and encode the whole rendering at once, so training ids are
exactly what inference encodes; the loss mask comes from each token's character offset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from phijax import paths
from phijax.data.chat import IM_END, assistant_spans
from phijax.errors import ConfigError

SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
CONFIG, SPECIALS_MAP = "tokenizer_config.json", "special_tokens_map.json"  # beside tokenizer.json
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = (SP_FILE, HF_FILE, CONFIG, SPECIALS_MAP, *TEMPLATE_FILES)


def tokenizer_file(path: str | Path) -> tuple[str, Path]:
    """(kind, file) of a tokenizer path: a `.json` file or a directory holding tokenizer.json
    is "hf"; any other file, or a directory holding tokenizer.model, is "sentencepiece". A
    gs:// or s3:// URL is read from a local copy of its tokenizer files."""
    if paths.is_url(path):
        if not paths.exists(path):
            raise ConfigError(f"tokenizer {path} does not exist")
        path = paths.local_copy(path, TOKENIZER_FILES)
    path = Path(path)
    if path.is_dir():
        for name, kind in ((HF_FILE, "hf"), (SP_FILE, "sentencepiece")):
            if (path / name).is_file():
                return kind, path / name
        raise ConfigError(f"tokenizer {path}: a directory with no {HF_FILE} or {SP_FILE}")
    if not path.is_file():
        raise ConfigError(f"tokenizer {path} does not exist")
    return ("hf" if path.suffix == ".json" else "sentencepiece"), path


def tokenizers_library(what: str):
    """The `tokenizers` package (Hugging Face's), or a ConfigError saying `what` needs it."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"{what} needs the `tokenizers` package (pip install tokenizers)") \
            from None
    return tokenizers


class Tokenizer:
    """Text <-> token ids. `Tokenizer(path)` builds the implementation the path names."""
    kinds: dict[str, type] = {}
    kind = ""
    path: Path  # the file that names the tokenizer (loadable again with `Tokenizer(path)`)
    eos_id: int
    pad_id: int

    def __init_subclass__(cls, kind: str = "", **kw):
        super().__init_subclass__(**kw)
        if kind:
            cls.kind = kind
            Tokenizer.kinds[kind] = cls

    def __new__(cls, path=None, *args, **kw):
        if cls is Tokenizer:
            cls = Tokenizer.kinds[tokenizer_file(path)[0]]
        return super().__new__(cls)

    # ------------------------------------------------------------ what each one implements
    @property
    def vocab_size(self) -> int:
        """One past the largest id the tokenizer produces or decodes."""
        raise NotImplementedError

    @property
    def hash(self) -> str:
        """A content hash of the tokenizer's files (stores record it)."""
        raise NotImplementedError

    def files(self) -> dict[str, Path]:
        """The files a run directory holds to load this tokenizer again: name -> source."""
        raise NotImplementedError

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        raise NotImplementedError

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like `encode`, as int32 arrays, on one thread."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for in decoded text; a token may hold part of a UTF-8
        character."""
        raise NotImplementedError

    def piece_id(self, piece: str) -> int | None:
        """The id of a whole piece (e.g. a special token), or None."""
        raise NotImplementedError

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text, through the tokenizer's chat template."""
        raise NotImplementedError

    @property
    def chat_template(self) -> str | None:
        """The jinja source of the chat template `render` uses, None where there is none."""
        raise NotImplementedError

    def encode_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of `text` and each token's (begin, end) character offsets."""
        raise NotImplementedError

    def hf_specials(self) -> dict[str, str | None]:
        """bos_token, eos_token, pad_token, unk_token as a Hugging Face export names them."""
        raise NotImplementedError

    def hf_files(self) -> dict[str, bytes]:
        """The tokenizer files of a Hugging Face model directory (tokenizer.json,
        tokenizer_config.json, ...): name -> content."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared
    @property
    def im_end_id(self) -> int:
        """<|im_end|>, or the end-of-document id where the vocabulary has no <|im_end|>."""
        found = self.piece_id(IM_END)
        return self.eos_id if found is None else found

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Where a chat reply ends: <|im_end|>, <|endoftext|>, and the eos token a Hugging Face
        tokenizer names, without repeats."""
        hf_eos = self.hf_specials().get("eos_token")
        ids = (self.im_end_id, self.eos_id, self.piece_id(hf_eos) if hf_eos else None)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered chat followed by an open assistant turn: what a model
        trained on `encode_chat` continues with its reply."""
        return list(self.encode([self.render(messages, True)])[0])

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], np.ndarray]:
        """Token ids of the rendered chat and a 0/1 loss mask, on for the tokens whose text
        overlaps an assistant turn (its reply and the template's closing of it); a token with
        empty offsets (byte-level tokenizers trim the spaces off them) when it lies inside."""
        text, spans = assistant_spans(self.render, messages, f"tokenizer {self.path}")
        ids, offsets = self.encode_offsets(text)
        begin, end = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), np.uint8)
        for lo, hi in spans:
            mask[(begin < hi) & (end > lo)] = 1
        return ids, mask
