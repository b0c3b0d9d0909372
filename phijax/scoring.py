"""Prompt log-probabilities from the model's own forward pass: `Phi.hidden_states` and
`Phi.logits`, the training forward, over each whole prompt.

For a prompt t_0 ... t_{L-1}, `prompt_logprobs` gives log p(t_i | t_<i) for i = 1 ... L-1 (the
first token has none), and optionally the `top` most likely ids at each of those positions,
which is what an OpenAI `echo` with `logprobs` returns. Ids from the sampler's `vocab_limit` on
get -inf, as in sampling.

The sampler holds its layers one dict per layer (`decoding_params`); the forward takes them
stacked, so each call stacks them inside the program (a transient copy of the layer weights).
Logits are computed a chunk of positions at a time: a (positions, vocab) block of float32 at
most CHUNK positions long. Prompts are right-padded to a common length (causal attention: the
padding changes nothing before it) in batches of at most TOKENS tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phijax.config import ModelConfig
from phijax.decoding import limit_vocab, pow2, slots_bucket
from phijax.model import abstract_model

CHUNK = 256    # positions whose logits are computed together
TOKENS = 4096  # prompt tokens (padding included) per call


class Scored(NamedTuple):
    """One prompt's scores: per token after the first, its log-prob, and (top > 0) the `top`
    most likely (id, log-prob) pairs there, most likely first (else None)."""
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None


@functools.lru_cache(maxsize=8)
def _graphdef(cfg_fields: tuple):
    return nnx.graphdef(abstract_model(ModelConfig(*cfg_fields)))


def _model(cfg: ModelConfig, params):
    """The model with stacked layers (as training holds it) from decoding params."""
    layers = params["layers"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[layers[i] for i in range(cfg.num_hidden_layers)])
    rest = {k: v for k, v in params.items() if k != "layers"}
    return nnx.merge(_graphdef(dataclasses.astuple(cfg)), {**rest, "layers": stacked})


def _score(cfg: ModelConfig, top: int, vocab_limit: int, params, tokens):
    """tokens (b, s) -> per position i < s - 1 the log-prob of tokens[:, i + 1], and the `top`
    most likely ids and their log-probs: (b, s - 1), (b, s - 1, top) twice."""
    model = _model(cfg, params)
    b, s = tokens.shape
    h = model.hidden_states(tokens)[:, :-1].reshape(b * (s - 1), -1)
    targets = tokens[:, 1:].reshape(-1)
    n = h.shape[0]
    chunks = -(-n // CHUNK)
    h = jnp.pad(h, ((0, chunks * CHUNK - n), (0, 0))).reshape(chunks, CHUNK, -1)
    targets = jnp.pad(targets, (0, chunks * CHUNK - n)).reshape(chunks, CHUNK)

    def one(args):
        hc, tc = args
        logp = jax.nn.log_softmax(limit_vocab(model.logits(hc), vocab_limit), axis=-1)
        lp = jnp.take_along_axis(logp, tc[:, None], axis=-1)[:, 0]
        if not top:
            return lp, jnp.zeros((CHUNK, 0), jnp.int32), jnp.zeros((CHUNK, 0), jnp.float32)
        top_lp, top_ids = jax.lax.top_k(logp, top)
        return lp, top_ids.astype(jnp.int32), top_lp

    lp, ids, top_lp = jax.lax.map(one, (h, targets))
    shape = lambda a: a.reshape(chunks * CHUNK, -1)[:n].reshape(b, s - 1, -1)
    return shape(lp)[..., 0], shape(ids), shape(top_lp)


@functools.lru_cache(maxsize=8)
def _program(cfg_fields: tuple):
    return jax.jit(functools.partial(_score, ModelConfig(*cfg_fields)), static_argnums=(0, 1))


def _batches(prompts: list[list[int]]) -> list[list[int]]:
    """Prompt indices in batches of similar length, at most TOKENS padded tokens each."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches, batch = [], []
    for i in order:
        width = slots_bucket(len(prompts[i]))
        if batch and pow2(len(batch) + 1) * width > TOKENS:
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def prompt_logprobs(sampler, prompts: list[list[int]], top: int = 0) -> list[Scored]:
    """Each prompt's `Scored` under `sampler`'s model (prompts of one token score nothing)."""
    program = _program(dataclasses.astuple(sampler.cfg))
    out: list[Scored | None] = [None] * len(prompts)
    for batch in _batches(prompts):
        width = slots_bucket(max(len(prompts[i]) for i in batch))
        tokens = np.zeros((pow2(len(batch)), width), np.int32)
        for k, i in enumerate(batch):
            tokens[k, :len(prompts[i])] = prompts[i]
        lp, ids, top_lp = jax.device_get(program(top, sampler.vocab_limit, sampler.params,
                                                 *sampler.put(tokens)))
        for k, i in enumerate(batch):
            n = len(prompts[i]) - 1
            tops = [list(zip(ids[k, j].tolist(), top_lp[k, j].tolist())) for j in range(n)]
            out[i] = Scored(lp[k, :n].tolist(), tops if top else None)
    return out
