"""Tokenizers: one interface (`Tokenizer`), two implementations, and a run directory's copy.

`load_tokenizer(path)` (the same as `Tokenizer(path)`) picks the implementation:
  a `.model` file, or a directory holding tokenizer.model    sentencepiece (tokenizer_sp.py: the
                                                             tokenizer `phijax tokenizer train`
                                                             makes, phi-4's chat format)
  a `.json` file, or a directory holding tokenizer.json      Hugging Face `tokenizers`
                                                             (tokenizer_hf.py: e.g. phi-4's own,
                                                             with its chat template and specials)
A directory holding both is read as Hugging Face.

A run directory holds its tokenizer as tokenizer.model (sentencepiece) or as tokenizer.json and
tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja where the source has them):
`save_tokenizer` copies them in, `find_tokenizer` finds them (for sampling, serving, evaluation
and `run.init_from`).
"""
from __future__ import annotations

from pathlib import Path

from phijax.data.chat import (EOS, IM_END, IM_SEP, IM_START, PAD, ROLES, SPECIALS, chat_error,
                              render_chat)
from phijax import paths
from phijax.data.tokenizer_base import HF_FILE, SP_FILE, TOKENIZER_FILES, Tokenizer, tokenizer_file
from phijax.data.tokenizer_hf import HFTokenizer, hf_files_at
from phijax.data.tokenizer_sp import SentencePieceTokenizer, padded_vocab_size, train_tokenizer

__all__ = ["EOS", "IM_END", "IM_SEP", "IM_START", "PAD", "ROLES", "SPECIALS", "HFTokenizer",
           "SentencePieceTokenizer", "Tokenizer", "chat_error", "find_tokenizer",
           "load_tokenizer", "padded_vocab_size", "render_chat", "save_tokenizer",
           "train_tokenizer"]

RUN_FILES = TOKENIZER_FILES  # what save_tokenizer owns


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path` (a file, or a directory holding one; see the module's
    docstring); ConfigError if there is none, DataError if it does not load."""
    return Tokenizer(path)


def find_tokenizer(run_dir: str | Path) -> Path | None:
    """The tokenizer file of a run directory (tokenizer.json, else tokenizer.model), or None."""
    for name in (HF_FILE, SP_FILE):
        if paths.exists(paths.as_path(run_dir) / name):
            return paths.as_path(run_dir) / name
    return None


def _files(tokenizer_or_path: Tokenizer | str | Path) -> dict[str, Path]:
    if isinstance(tokenizer_or_path, Tokenizer):
        return tokenizer_or_path.files()
    kind, path = tokenizer_file(tokenizer_or_path)
    return hf_files_at(path) if kind == HFTokenizer.kind else {SP_FILE: path}


def save_tokenizer(tokenizer_or_path: Tokenizer | str | Path, run_dir: str | Path) -> Path:
    """Copy a tokenizer's files (a Tokenizer, or a path `load_tokenizer` takes) into
    `run_dir`, each written whole or not at all, and remove another tokenizer's files there;
    returns the file `find_tokenizer(run_dir)` then gives."""
    run_dir = paths.as_path(run_dir)
    files = _files(tokenizer_or_path)
    local = not paths.is_url(run_dir)
    if local:
        run_dir.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = run_dir / name
        if not (local and target.exists() and target.resolve() == source.resolve()):
            paths.write_bytes(target, source.read_bytes())
    for name in RUN_FILES:
        if name not in files:
            paths.remove(run_dir / name)
    return run_dir / (HF_FILE if HF_FILE in files else SP_FILE)
