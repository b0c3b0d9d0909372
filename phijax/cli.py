"""phijax: train, post-train, sample, serve, convert and evaluate Phi models in JAX."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from phijax.config import load_config
from phijax.errors import ConfigError, UserError


def _info(args) -> int:
    import numpy as np
    from flax import nnx

    from phijax.model import abstract_model

    cfg = load_config(args.config, args.overrides)
    abstract = abstract_model(cfg.model)
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


def _sft(args) -> int:
    from phijax.posttrain.sft import check_sft, sft_task
    from phijax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    check_sft(cfg)
    train(cfg, sft_task)
    return 0


def _dpo(args) -> int:
    from phijax.posttrain.dpo import dpo_task
    from phijax.train.loop import train

    train(load_config(args.config, args.overrides), dpo_task)
    return 0


def _sample(args) -> int:
    from phijax.sampling import Request, Sampler
    from phijax.weights import load_checkpoint

    if (args.prompt is None) == (args.prompt_ids is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompt-ids 1,2,3")
    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: not comma-separated integers")
    # --prompt-ids needs no tokenizer (a checkpoint converted without one prints token ids)
    cfg, params, tokenizer, mesh = load_checkpoint(args.ckpt,
                                                   need_tokenizer=args.prompt is not None)
    sampler = Sampler(cfg.model, params, mesh,
                      vocab_limit=tokenizer.vocab_size if tokenizer else None)
    if args.prompt is not None:
        prompt = tokenizer.encode([args.prompt])[0]
    request = Request(prompt, n=args.n, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      stop_ids=(tokenizer.eos_id,) if tokenizer else (), seed=args.seed)
    for i, s in enumerate(sampler.generate([request])[0]):
        print(f"--- sample {i + 1}/{args.n}: {len(s.tokens)} tokens, finish {s.finish_reason}, "
              f"logprob {sum(s.logprobs):.2f}")
        print(tokenizer.decode(s.tokens) if tokenizer else ",".join(map(str, s.tokens)))
    return 0


def _serve(args) -> int:
    from phijax.serve import serve

    return serve(args.ckpt, host=args.host, port=args.port, model_name=args.model_name,
                 max_batch=args.max_batch, segment=args.segment)


def _convert(args) -> int:
    from phijax import convert

    if args.direction == "from-hf":
        print(convert.from_hf(args.src, args.dst))
    else:
        print(convert.to_hf(args.src, args.dst, dtype=args.dtype, max_shard_gb=args.max_shard_gb))
    return 0


def _eval(args) -> int:
    targets = [t for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t] + list(args.overrides)
    if targets and targets[0] == "compare":
        return _eval_compare(targets[1:], args.plot)
    if len(targets) != 1:
        raise ConfigError(f"eval: give one checkpoint, or `compare OUT1 OUT2 ...` (got "
                          f"{' '.join(targets) or 'none'})")
    if args.lm_eval:
        return _eval_lm_eval(targets[0], args)
    from phijax.config import check_fields, load
    from phijax.eval.harness import HarnessConfig, run_eval
    from phijax.eval.report import format_results

    cfg = load(HarnessConfig, args.config, overrides)
    if args.tasks:
        cfg.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.questions:  # the arith task on a question file
        cfg.tasks, cfg.paths = ["arith"], {"arith": args.questions}
    cfg.data_dir = args.data_dir or cfg.data_dir
    cfg.limit = args.limit if args.limit is not None else cfg.limit
    check_fields(cfg)
    doc = run_eval(targets[0], cfg, args.out)
    print(format_results(doc))
    print(json.dumps(doc["tasks"]))
    return 0


def _eval_lm_eval(run_dir: str, args) -> int:
    from phijax.eval.lm_harness import format_lm_eval, run_lm_eval

    if args.tasks or args.questions:
        raise ConfigError("--lm-eval names its own tasks; give it without --tasks/--questions")
    results = run_lm_eval(run_dir, args.lm_eval, args.out, args.limit, args.lm_eval_include)
    print(format_lm_eval(results))
    print(json.dumps(results))
    return 0


def _eval_compare(outs: list[str], plot_path: str | None) -> int:
    from phijax.eval.report import compare, plot

    table, rows = compare(outs)
    print(table)
    if plot_path:
        print(f"plot: {plot(rows, [f'run {i}' for i in range(len(outs))], plot_path)}")
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
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.stale_after <= 0 or args.poll <= 0:
        raise ConfigError("--stale-after and --poll must be positive")
    tokenizer = Tokenizer(args.tokenizer)
    if args.shared:
        from phijax.data.store_workers import build_store_shared
        built = build_store_shared(args.inputs, tokenizer, args.out, args.text_field, args.glob,
                                   args.workers, args.stale_after, args.poll)
    else:
        built = build_store(args.inputs, tokenizer, args.out, args.text_field, args.glob,
                            args.workers)
    store = TokenStore(built)
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
    from phijax.data.prepare import source_tokens

    mixture = load_mixture(args.mixture)
    data = load_config(args.config, args.overrides).data  # the tokenizer a corpus source gets
    counts = source_tokens(data, mixture)
    print(format_plan(plan(mixture, args.tokens, counts), args.tokens, mixture.max_epochs))
    return 0


def _plan(args) -> int:
    from phijax.plan.command import run

    return run(args)


RUN_DIR = "run directory (config.yaml, its tokenizer, checkpoints/)"


def _add_config_commands(sub) -> None:
    for name, fn, help_ in (("train", _train, "train or resume a run"),
                            ("sft", _sft, "fine-tune a checkpoint (run.init_from) on chats"),
                            ("dpo", _dpo, "DPO from a checkpoint on token-id pairs (dpo.pairs)"),
                            ("info", _info, "parameter count and breakdown (no allocation)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
        s.set_defaults(fn=fn)


def _add_checkpoint_commands(sub) -> None:
    s = sub.add_parser("sample", help="sample completions from a checkpoint (run directory)")
    s.add_argument("ckpt", help=RUN_DIR)
    s.add_argument("--prompt", help="text to continue")
    s.add_argument("--prompt-ids", help="token ids to continue, e.g. 12,7,99 (no tokenizing)")
    s.add_argument("-n", type=int, default=1, help="samples (sharing one prefill)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_sample)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server over a checkpoint")
    s.add_argument("ckpt", help=RUN_DIR)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--model-name", help="model id clients send (default: the run directory's name)")
    s.add_argument("--max-batch", type=int, default=64,
                   help="sample rows decoded together (a larger request runs alone)")
    s.add_argument("--segment", type=int, default=8,
                   help="decode steps between the points where new requests join the batch")
    s.set_defaults(fn=_serve)
    s = sub.add_parser("eval", help="score a checkpoint on benchmark tasks, or compare runs "
                       "(`phijax eval compare OUT1 OUT2`)")
    s.add_argument("targets", nargs="+", metavar="CKPT",
                   help="a run directory (or `compare OUT1 OUT2 ...`), then key=value settings "
                   "(samples=4 temperature=1 max_new_tokens=256 seed=0 batch=64)")
    s.add_argument("--tasks", help="comma-separated: gsm8k,math,mmlu,gpqa,humaneval,mbpp,"
                   "simpleqa,arith")
    s.add_argument("--data-dir", help="directory holding each task's public data file")
    s.add_argument("--limit", type=int, help="the first N items of each task")
    s.add_argument("--out", help="write results.json and items/<task>.jsonl here")
    s.add_argument("--questions", help="a question JSONL (id, kind, prompt, answer): the arith task")
    s.add_argument("--config", help="YAML of evaluation settings (tasks, paths, samples, ...)")
    s.add_argument("--plot", help="with compare: write a bar chart (PNG) here")
    s.add_argument("--lm-eval", metavar="TASKS", help="run lm-evaluation-harness tasks "
                   "(comma-separated) against the checkpoint, served on a free port")
    s.add_argument("--lm-eval-include", metavar="DIR", help="with --lm-eval: a folder of "
                   "lm-eval task YAMLs")
    s.set_defaults(fn=_eval, overrides=[])


def _add_convert_commands(sub) -> None:
    conv = sub.add_parser("convert", help="Hugging Face Phi3ForCausalLM <-> phijax checkpoint")
    conv = conv.add_subparsers(dest="direction", required=True)
    s = conv.add_parser("from-hf", help="HF_DIR (config.json + safetensors) -> run directory")
    s.add_argument("src", metavar="HF_DIR")
    s.add_argument("dst", metavar="CKPT")
    s.set_defaults(fn=_convert)
    s = conv.add_parser("to-hf", help="run directory -> HF_DIR (config.json + safetensors)")
    s.add_argument("src", metavar="CKPT")
    s.add_argument("dst", metavar="HF_DIR")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--max-shard-gb", type=float, default=5.0)
    s.set_defaults(fn=_convert)


def _add_data_commands(sub) -> None:
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
    s.add_argument("--tokenizer", required=True,
                   help="a sentencepiece .model, or a tokenizer.json (or a directory holding one)")
    s.add_argument("--out", required=True, help="store directory")
    s.add_argument("--text-field", default="text", help="JSONL text field (else `messages`)")
    s.add_argument("--glob", help="files of an input directory to read, e.g. '**/*.py'")
    s.add_argument("--workers", type=int, help="processes (default: every core)")
    s.add_argument("--shared", action="store_true",
                   help="one of any number of workers, on any machines, running this command "
                   "with the same --out (a bucket, or a shared file system): they claim shards, "
                   "take over a killed worker's, and one assembles the store")
    s.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                   help="with --shared: a claim whose heartbeat is older than this is taken over")
    s.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                   help="with --shared: seconds between looks while other workers hold the "
                   "last shards")
    s.set_defaults(fn=_data_tokenize)
    s = data.add_parser("report", help="plan a mixture: tokens seen and epochs per source")
    s.add_argument("mixture", help="mixture YAML, e.g. configs/mixtures/phi-4.yaml")
    s.add_argument("--tokens", type=_token_count, required=True, help="training tokens, e.g. 10T")
    s.add_argument("--config", help="training config whose `data` section says how a corpus "
                   "source is tokenized (default: the data defaults); its tokens are counted "
                   "in the store a run builds (data.cache_dir)")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. "
                   "data.cache_dir=/tmp/cache")
    s.set_defaults(fn=_data_report)


def _add_plan_commands(sub) -> None:
    from phijax.plan.programs import STEPS

    s = sub.add_parser("plan", help="compile the train (sft, dpo, decode) step for a TPU slice "
                       "from this host: memory per device, FLOPs, collectives, roofline step "
                       "time and cost")
    s.add_argument("config", help="YAML config file")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=64")
    s.add_argument("--topology", required=True, help="v5p-128 (v4-N and v5p-N count "
                   "TensorCores), v6e-256, v5e-16, a libtpu shape such as v5p:4x4x8, cpu-8, "
                   "h100x8 or h200x8 (GPUs: an analytic estimate)")
    s.add_argument("--out", default="plan.json", help="write the plan as JSON here ('' not at all)")
    s.add_argument("--tokens", type=_token_count, help="training tokens to cost, e.g. 9.8T")
    s.add_argument("--hbm", help="memory budget per device instead of the chip's, e.g. 64GiB")
    s.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of the budget to keep free (default 0.1)")
    s.add_argument("--search", nargs="?", const="mesh,remat,microbatches", metavar="AXES",
                   help="find the fastest plan that fits over mesh,remat,microbatches (or a "
                   "comma-separated subset)")
    s.add_argument("--step", choices=STEPS, default="train",
                   help="the program to plan: the step of phijax train, sft or dpo, or a "
                   "sampler's decode step (default train)")
    s.add_argument("--batch", type=int, help="decode: rows decoded together "
                   "(default train.batch_size)")
    s.add_argument("--cache-len", type=int, help="decode: KV cache slots per row "
                   "(default model.max_position_embeddings)")
    s.set_defaults(fn=_plan)


def _add_sweep_commands(sub) -> None:
    from phijax.sweep.command import add_sweep_commands

    add_sweep_commands(sub)


def _add_launch_commands(sub) -> None:
    from phijax.launch.command import add_parser

    add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phijax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_config_commands, _add_checkpoint_commands, _add_convert_commands,
                _add_data_commands, _add_plan_commands, _add_sweep_commands,
                _add_launch_commands):
        add(sub)
    return p


# Every console script of phijax and its tools runs through `run_main`: logging to stderr, and a
# user's mistake printed as one line `PROG: error: ...` with exit status 2.
def run_main(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv`, set up logging and run the chosen command (`args.fn(args)`). A user's
    mistake (`phijax.errors.UserError`) or a file-system error (a missing file, a directory
    where a file belongs, a port in use) becomes one line and exit 2; anything else is a bug
    and keeps its traceback."""
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow the options (`pts RUN Q --out P rollouts=32`).
    if extra and hasattr(args, "overrides") and all("=" in a and a[0] != "-" for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    # orbax's per-save chatter, "Unable to initialize backend 'tpu'", bucket clients' per-request
    for noisy in ("absl", "jax", "gcsfs", "fsspec", "botocore", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except (UserError, OSError) as e:
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """The error as one line; an OSError as `PATH: what went wrong`."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        return f"{where}: {e.strerror}" if where else e.strerror
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), argv)
