"""`phijax` command line: train | info | tokenizer train | data tokenize | data report."""
from __future__ import annotations

import argparse
import logging
import sys

from phijax.config import ConfigError, load_config


def _info(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from phijax.model import init_model

    cfg = load_config(args.config, args.overrides)
    abstract = nnx.eval_shape(lambda: init_model(cfg.model, 0))
    groups: dict[str, int] = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        name = "norms" if path[-1] == "scale" else ".".join(str(p) for p in path)
        name = {"embed": "embedding", "layers.attn.qkv": "attention", "layers.attn.o": "attention",
                "layers.mlp.gate": "mlp", "layers.mlp.up": "mlp", "layers.mlp.down": "mlp"}.get(name, name)
        groups[name] = groups.get(name, 0) + int(np.prod(var.shape))
    total = sum(groups.values())
    m = cfg.model
    print(f"model: {m.num_hidden_layers} layers, hidden {m.hidden_size}, heads "
          f"{m.num_attention_heads}/{m.num_key_value_heads} kv, head_dim {m.dim_per_head}, "
          f"ffn {m.intermediate_size}, vocab {m.vocab_size}, tied {m.tie_word_embeddings}")
    for name, count in groups.items():
        print(f"  {name:<12} {count:>16,}  {count / 1e9:8.3f}B  {100 * count / total:5.1f}%")
    print(f"  {'total':<12} {total:>16,}  {total / 1e9:8.3f}B")
    return 0


def _train(args) -> int:
    from phijax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def _tokenizer_train(args) -> int:
    from phijax.data.corpus import check_specs, documents
    from phijax.data.tokenizer import train_tokenizer

    check_specs(args.inputs)
    path = train_tokenizer(documents(args.inputs, args.text_field, glob=args.glob), args.out,
                           args.vocab_size, args.multiple)
    print(path)
    return 0


def _data_tokenize(args) -> int:
    from phijax.data.corpus import check_specs
    from phijax.data.store import TokenStore, build_store
    from phijax.data.tokenizer import Tokenizer

    check_specs(args.inputs)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1")
    tokenizer = Tokenizer(args.tokenizer)
    store = TokenStore(build_store(args.inputs, tokenizer, args.out, args.text_field, args.glob,
                                   args.workers))
    m = store.manifest
    print(f"{store.path}: {m['documents']:,} documents ({m['chat_documents']:,} chats), "
          f"{m['tokens']:,} tokens")
    if m["skipped"]:
        print(f"skipped {sum(m['skipped'].values())} records: " + ", ".join(
            f"{reason} {n}" for reason, n in m["skipped"].items()), file=sys.stderr)
    for example in m["skipped_examples"]:
        print(f"skipped {example}", file=sys.stderr)
    return 0


def _token_count(text: str) -> float:
    """'10T', '290B', '5e9' -> a number of tokens."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    text = text.strip().upper()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens: {text!r} is not a token count like 10T")


def _data_report(args) -> int:
    from phijax.data.mixture import format_plan, load_mixture, plan

    mixture = load_mixture(args.mixture)
    print(format_plan(plan(mixture, args.tokens), args.tokens, mixture.max_epochs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phijax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", _train, "train or resume a run"),
                            ("info", _info, "parameter count and breakdown (no allocation)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
        s.set_defaults(fn=fn)
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="sub", required=True)
    s = tok.add_parser("train", help="train a sentencepiece BPE tokenizer")
    s.add_argument("inputs", nargs="+", help="JSONL/text files, directories or builtin:python-docs")
    s.add_argument("--out", required=True, help="output prefix; writes OUT.model")
    s.add_argument("--vocab-size", type=int, default=32000, help="pieces to train")
    s.add_argument("--multiple", type=int, default=128,
                   help="pad the vocabulary with unused pieces to a multiple of this")
    s.add_argument("--text-field", default="text")
    s.add_argument("--glob", help="files of an input directory to read, e.g. '**/*.py'")
    s.set_defaults(fn=_tokenizer_train)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="sub", required=True)
    s = data.add_parser("tokenize", help="tokenize a corpus into a token store (resumable)")
    s.add_argument("inputs", nargs="+", help="JSONL/text files, directories or builtin:...")
    s.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    s.add_argument("--out", required=True, help="store directory")
    s.add_argument("--text-field", default="text", help="JSONL text field (else `messages`)")
    s.add_argument("--glob", help="files of an input directory to read, e.g. '**/*.py'")
    s.add_argument("--workers", type=int, help="processes (default: every core)")
    s.set_defaults(fn=_data_tokenize)
    s = data.add_parser("report", help="plan a mixture: tokens seen and epochs per source")
    s.add_argument("mixture", help="mixture YAML, e.g. configs/mixtures/phi-4.yaml")
    s.add_argument("--tokens", type=_token_count, required=True, help="training tokens, e.g. 10T")
    s.set_defaults(fn=_data_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax"):  # orbax's per-save chatter, "Unable to initialize backend 'tpu'"
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except (ConfigError, ValueError) as e:
        print(f"phijax: error: {e}", file=sys.stderr)
        return 2
