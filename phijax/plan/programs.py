"""The programs `phijax plan --step` traces, each built by the functions its command runs, with
abstract (shape, dtype, sharding) arguments:

  train   `phijax train`'s step: `build_trainer` with the LM objective, (batch_size, seq_len)
  sft     `phijax sft`'s step: the same LM step (the loss reads the assistant tokens through the
          batch's loss weights), so the same program
  dpo     `phijax dpo`'s step: `build_trainer` with the DPO objective on batch_size pairs (a
          chosen and a rejected row each), and the reference pass run once before training
          (`phijax.posttrain.dpo.reference_pass`); training holds one model, the policy
  decode  a decode segment of the sampler (`phijax.decoding.programs`, what `phijax sample` and
          `serve` jit) for `batch` rows over a KV cache of `cache_len` slots, its rows sampling
          at a temperature (a default request); one step is one pass of its loop. Rows are
          split over the batch axes where they divide (as `Sampler.put` does), the cache as its
          rows and its KV heads over `tensor`
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

from phijax.config import Config
from phijax.errors import ConfigError

STEPS = ("train", "sft", "dpo", "decode")
FLOAT_KEYS = ("loss_weights", "ref_logps", "weights")


@dataclass
class Program:
    label: str  # as the log and the table name it: "the train step"
    traced: Any
    state: dict  # "params", "optimizer", "kv_cache" -> abstract arrays (with shardings)
    tokens_per_step: int
    flops_per_token: float  # model FLOPs (`phijax.train.metrics`)
    shape: dict  # what the step is sized by, for the plan's header
    attention_flops: float = 0.0  # per step (global) done as no dot_general in the jaxpr
    reads_per_step: Optional[float] = None  # decode: bytes per device read from HBM per step
    before: list = field(default_factory=list)  # programs run once before the steps (DPO)


def build(step: str, cfg: Config, mesh, batch: Optional[int] = None,
          cache_len: Optional[int] = None) -> Program:
    """`step`'s program on `mesh`; decode for `batch` rows (default train.batch_size) over
    `cache_len` slots (default model.max_position_embeddings)."""
    if step == "decode":
        return _decode(cfg, mesh, batch or cfg.train.batch_size,
                       cache_len or cfg.model.max_position_embeddings)
    if step == "dpo":
        return _dpo(cfg, mesh)
    return _train(cfg, mesh, "the SFT step" if step == "sft" else "the train step")


def _traced(fn, mesh, *args):
    import jax

    with jax.set_mesh(mesh):
        return fn.trace(*args)


def _abstract_batch(shardings: dict, dims: dict, shape: tuple) -> dict:
    """Batch key k of rank n: shape[:n]; loss weights and the DPO keys float32, the rest int32."""
    import jax
    import jax.numpy as jnp

    return {k: jax.ShapeDtypeStruct(shape[:dims[k]], jnp.float32 if k in FLOAT_KEYS else jnp.int32,
                                    sharding=s) for k, s in shardings.items()}


def _train(cfg: Config, mesh, label: str, objective=None, batch_dims=None,
           rows_per_example: int = 1) -> Program:
    from phijax.train.metrics import flops_per_token
    from phijax.train.step import BATCH_KEYS, build_trainer

    trainer = build_trainer(cfg, mesh, objective, batch_dims)
    b, s = cfg.train.batch_size, cfg.data.seq_len
    shape = (b, s) if rows_per_example == 1 else (b, rows_per_example, s)
    batch = _abstract_batch(trainer.batch_shardings, batch_dims or {k: 2 for k in BATCH_KEYS},
                            shape)
    state = trainer.abstract_state
    return Program(label, _traced(trainer.train_step, mesh, state, batch),
                   {"params": state["params"], "optimizer": state["opt_state"]},
                   tokens_per_step=b * rows_per_example * s,
                   flops_per_token=flops_per_token(cfg.model, s),
                   shape={"batch_size": b, "seq_len": s, "microbatches": cfg.train.microbatches,
                          "remat": cfg.model.remat})


def _dpo(cfg: Config, mesh) -> Program:
    from phijax.posttrain.dpo import BATCH_DIMS, dpo_objective, reference_pass
    from phijax.sharding import batch_sharding
    from phijax.train.step import BATCH_KEYS
    from phijax.weights import abstract_params

    step = _train(cfg, mesh, "the DPO step", dpo_objective(cfg.dpo), BATCH_DIMS, 2)
    rows = 2 * cfg.train.batch_size  # each pair's chosen and rejected rows, scored at once
    batch = _abstract_batch({k: batch_sharding(mesh, 2) for k in BATCH_KEYS},
                            {k: 2 for k in BATCH_KEYS}, (rows, cfg.data.seq_len))
    params = abstract_params(cfg, mesh)
    reference = Program("the DPO reference pass", _traced(reference_pass(cfg, mesh), mesh,
                                                          params, batch),
                        {"params": params}, rows * cfg.data.seq_len, 0.0,
                        {"rows": rows, "seq_len": cfg.data.seq_len})
    step.before.append(reference)
    return step


def _decoding_params(cfg: Config, mesh):
    """The sampler's parameters (`phijax.model.decoding_params` of the checkpoint's, as
    `load_checkpoint` places them): each layer's arrays keep their stacked sharding, without
    the layer axis."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from phijax.model import decoding_params
    from phijax.weights import abstract_params

    stacked = abstract_params(cfg, mesh)
    shapes = jax.eval_shape(functools.partial(decoding_params, cfg.model), stacked)

    def place(path, leaf):
        keys = [k.key for k in path]
        layer = keys[0] == "layers"
        source = functools.reduce(operator.getitem, ["layers", *keys[2:]] if layer else keys,
                                  stacked)
        spec = P(*source.sharding.spec[1:]) if layer else source.sharding.spec
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, shapes)


def _decode(cfg: Config, mesh, batch: int, cache_len: int) -> Program:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from phijax.decoding import SEGMENT, Choice, programs
    from phijax.model import empty_caches
    from phijax.plan.report import per_device_bytes
    from phijax.rows import ROW_TYPES
    from phijax.sharding import RULES, spec_for
    from phijax.train.metrics import decode_flops_per_token

    m = cfg.model
    if cache_len > m.max_position_embeddings:
        raise ConfigError(f"--cache-len {cache_len} exceeds model.max_position_embeddings "
                          f"{m.max_position_embeddings}, the longest the sampler decodes")
    dp = 1
    for axis in RULES["batch"]:
        dp *= mesh.shape[axis]
    # Row arrays are split over the data axes where the rows divide (`Sampler.put`).
    rows_sh = NamedSharding(mesh, P(RULES["batch"]) if batch % dp == 0 else P())
    rows = lambda dtype, *shape: jax.ShapeDtypeStruct((batch, *shape), dtype, sharding=rows_sh)
    names = (("batch", "kv_heads", "head_dim", None), ("batch", "kv_heads", None, "head_dim"))
    caches = [tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
        mesh, spec_for(n, a.shape, mesh))) for a, n in zip(layer, names))
        for layer in jax.eval_shape(lambda: empty_caches(m, batch, cache_len))]
    row = {**{k: rows(t) for k, t in ROW_TYPES.items() if k != "top"},
           "stop_ids": rows(jnp.int32, 4)}
    slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    params = _decoding_params(cfg, mesh)
    _, _, decode = programs(dataclasses.astuple(m))
    how = Choice(greedy=False, sample=True, filtering=False)
    # traced as the sampler calls it: outside any mesh context, its arguments' shardings alone
    traced = decode.trace(how, m.vocab_size, SEGMENT, params, caches, rows(jnp.int32),
                          rows(jnp.bool_), slot, row)
    per_token = decode_flops_per_token(m, cache_len)
    return Program("a decode step", traced, {"params": params, "kv_cache": caches},
                   tokens_per_step=batch, flops_per_token=per_token,
                   shape={"batch": batch, "cache_len": cache_len, "dtype": m.dtype},
                   attention_flops=(per_token - decode_flops_per_token(m, 0)) * batch,
                   reads_per_step=per_device_bytes(params) + per_device_bytes(caches))
