"""Batched sampling with a KV cache: exactness against full forward passes, fan-out, seeds,
stops, filters, and sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phijax.config import MeshConfig, ModelConfig
from phijax.model import init_model
from phijax.sampling import Request, Sampler
from phijax.sharding import make_mesh

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, dtype="float32", remat="none")


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, 3)


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(CFG, nnx.to_pure_dict(nnx.state(model)))


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, n).tolist() for n in (5, 17, 40)]


def test_greedy_with_cache_equals_argmax_of_full_forward_passes(model, sampler):
    prompts = _prompts()
    # 40 new tokens: past the first decode segment (the cache grows, finished rows are dropped)
    out = sampler.generate([Request(p, max_new_tokens=40, temperature=0.0) for p in prompts])
    forward = jax.jit(lambda ids: jax.nn.log_softmax(model(ids)[0]))  # one compile: fixed length
    for prompt, (sample,) in zip(prompts, out):
        ids, logprobs = list(prompt), []
        for _ in range(40):  # causal: the padding after the last real token changes nothing
            logp = forward(jnp.array([ids + [0] * (96 - len(ids))]))[len(ids) - 1]
            ids.append(int(jnp.argmax(logp)))
            logprobs.append(float(logp[ids[-1]]))
        assert sample.tokens == ids[len(prompt):]  # token for token
        np.testing.assert_allclose(sample.logprobs, logprobs, atol=1e-4)
        assert sample.finish_reason == "length"


def test_fan_out_gives_the_tokens_of_independent_prefills(sampler):
    prompts = _prompts()
    requests = [Request(p, n=5, max_new_tokens=10, temperature=1.0, seed=7) for p in prompts]
    shared = sampler.generate(requests)
    separate = sampler.generate(requests, share_prefix=False)
    assert [[s.tokens for s in r] for r in shared] == [[s.tokens for s in r] for r in separate]
    for a, b in zip(shared, separate):
        np.testing.assert_allclose([s.logprobs for s in a], [s.logprobs for s in b], atol=1e-5)
    assert len({tuple(s.tokens) for s in shared[0]}) > 1  # the n samples differ


def test_seeds_fix_samples_whatever_else_is_in_the_batch(sampler):
    p = _prompts()
    alone = sampler.generate([Request(p[1], n=3, max_new_tokens=8, seed=11)])[0]
    crowded = sampler.generate([Request(p[0], n=2, max_new_tokens=20, seed=5),
                                Request(p[1], n=3, max_new_tokens=8, seed=11)])[1]
    assert [s.tokens for s in alone] == [s.tokens for s in crowded]
    other = sampler.generate([Request(p[1], n=3, max_new_tokens=8, seed=12)])[0]
    assert [s.tokens for s in other] != [s.tokens for s in alone]


def test_a_long_sample_is_the_same_after_the_short_ones_are_dropped(sampler):
    """15 rows stop after 3 tokens, one goes on to 70: after the first decode segment it is
    decoded alone in a smaller batch, and its tokens are those of sampling it by itself."""
    p = _prompts()
    long = Request(p[2], n=1, max_new_tokens=70, seed=2)
    crowded = sampler.generate([Request(p[0], n=15, max_new_tokens=3, seed=1), long])
    alone = sampler.generate([long])[0][0]
    assert [len(s.tokens) for s in crowded[0]] == [3] * 15
    assert crowded[1][0].tokens == alone.tokens and len(alone.tokens) == 70
    np.testing.assert_allclose(crowded[1][0].logprobs, alone.logprobs, atol=1e-5)


def test_stop_tokens_and_max_new_tokens_per_request(sampler):
    p = _prompts()
    greedy = sampler.generate([Request(p[0], max_new_tokens=10, temperature=0.0)])[0][0].tokens
    stop = greedy[4]
    first = greedy.index(stop)
    out = sampler.generate([Request(p[0], max_new_tokens=10, temperature=0.0, stop_ids=(stop,)),
                            Request(p[1], max_new_tokens=3, temperature=0.0)])
    assert out[0][0].tokens == greedy[:first + 1] and out[0][0].finish_reason == "stop"
    assert len(out[1][0].tokens) == 3 and out[1][0].finish_reason == "length"


def test_top_k_one_and_tiny_top_p_are_greedy(sampler):
    p = _prompts()[2]
    greedy = sampler.generate([Request(p, max_new_tokens=8, temperature=0.0)])[0][0].tokens
    out = sampler.generate([Request(p, n=3, max_new_tokens=8, temperature=1.5, top_k=1, seed=1),
                            Request(p, n=3, max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=2)])
    assert all(s.tokens == greedy for r in out for s in r)


def test_bad_requests_name_the_problem(sampler):
    with pytest.raises(ValueError, match="request 0: prompt of 250 tokens \\+ 10 new tokens "
                                         "exceeds the context length 256"):
        sampler.generate([Request([1] * 250, max_new_tokens=10)])
    with pytest.raises(ValueError, match="top_p must be in"):
        sampler.generate([Request([1], top_p=0.0)])


def test_sharded_sampling_matches_one_device(model):
    params = nnx.to_pure_dict(nnx.state(model))
    one = Sampler(CFG, params).generate(
        [Request(p, n=2, max_new_tokens=6, seed=4) for p in _prompts()] +
        [Request(_prompts()[0], max_new_tokens=6, temperature=0.0)])
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    from phijax.sharding import named, param_specs
    _, state = nnx.split(model)
    sharded = jax.device_put(params, named(param_specs(state, mesh), mesh))
    many = Sampler(CFG, sharded, mesh).generate(
        [Request(p, n=2, max_new_tokens=6, seed=4) for p in _prompts()] +
        [Request(_prompts()[0], max_new_tokens=6, temperature=0.0)])
    assert [[s.tokens for s in r] for r in one] == [[s.tokens for s in r] for r in many]
    for a, b in zip(one, many):
        np.testing.assert_allclose([s.logprobs for s in a], [s.logprobs for s in b], atol=1e-4)


def test_ids_past_the_tokenizer_vocabulary_are_never_drawn(model):
    limited = Sampler(CFG, nnx.to_pure_dict(nnx.state(model)), vocab_limit=100)
    out = limited.generate([Request([1, 2, 3], n=64, max_new_tokens=16, seed=1)])[0]
    assert max(max(s.tokens) for s in out) < 100


def test_generate_from_another_thread_gives_the_same_tokens():
    """Servers and the judge sample from worker threads: a model shape first compiled there
    works, and gives the tokens the main thread gets."""
    import dataclasses
    import threading
    cfg = dataclasses.replace(CFG, intermediate_size=96)  # a shape no other test compiled
    sampler = Sampler(cfg, nnx.to_pure_dict(nnx.state(init_model(cfg, 1))))
    request = [Request(_prompts()[0], max_new_tokens=6, temperature=1.0, seed=5)]
    got = []
    worker = threading.Thread(target=lambda: got.append(sampler.generate(request)))
    worker.start()
    worker.join()
    assert [s.tokens for s in got[0][0]] == [s.tokens for s in sampler.generate(request)[0]]


def test_top_logprobs_are_the_models_most_likely_tokens(model, sampler):
    """A request's top_logprobs are the most likely ids of the full forward pass at each new
    token, most likely first; a request that asks for none gets None."""
    p = _prompts()
    out = sampler.generate([Request(p[1], n=2, max_new_tokens=40, seed=1, top_logprobs=3),
                            Request(p[0], max_new_tokens=5, temperature=0.0)])
    assert out[1][0].top_logprobs is None
    for sample in out[0]:
        assert len(sample.top_logprobs) == len(sample.tokens) == 40
        logp = jax.nn.log_softmax(model(jnp.array([p[1] + sample.tokens]))[0])
        for k, top in enumerate(sample.top_logprobs):
            row = np.asarray(logp[len(p[1]) - 1 + k])
            assert [i for i, _ in top] == np.argsort(-row)[:3].tolist()
            np.testing.assert_allclose([lp for _, lp in top], np.sort(row)[::-1][:3], atol=1e-4)


def test_prompt_logprobs_are_the_forward_passes(model):
    limited = Sampler(CFG, nnx.to_pure_dict(nnx.state(model)), vocab_limit=200)
    prompts = [[7], [3, 9, 1, 4]] + _prompts()
    scored = limited.prompt_logprobs(prompts, top=2)
    for prompt, s in zip(prompts, scored):
        logits = model(jnp.array([prompt]))[0]
        logp = np.asarray(jax.nn.log_softmax(jnp.where(jnp.arange(256) < 200, logits, -jnp.inf)))
        assert len(s.logprobs) == len(s.top) == len(prompt) - 1
        np.testing.assert_allclose(s.logprobs, [logp[i, t] for i, t in enumerate(prompt[1:])],
                                   atol=1e-4)
        assert [[i for i, _ in top] for top in s.top] == \
            [np.argsort(-row)[:2].tolist() for row in logp[:-1]]
    assert limited.prompt_logprobs([[5, 6]])[0].top is None


def test_a_sample_does_not_depend_on_the_filters_of_others(sampler):
    p = _prompts()
    plain = Request(p[0], n=2, max_new_tokens=12, seed=9)
    alone = sampler.generate([plain])[0]
    beside = sampler.generate([plain, Request(p[1], max_new_tokens=12, top_p=0.5, top_k=3,
                                              seed=1)])[0]
    assert [s.tokens for s in alone] == [s.tokens for s in beside]


def test_greedy_picks_the_first_of_equal_maxima_as_argmax_does():
    from phijax.decoding import _argmax, _blocks

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 300)).astype(np.float32)  # 300: the last block is partial
    logits[1, [7, 200]] = 9.0       # a tie across blocks: the first
    logits[2, [130, 131]] = 9.0     # a tie inside a block
    logits[3, 299] = 9.0            # the maximum in the partial block
    logits[4, 100:] = -np.inf       # ids masked off (vocab_limit)
    logits[5, :] = -np.inf
    logits[5, 250] = 0.0
    got = np.asarray(jax.jit(lambda x: _argmax(*_blocks(x)))(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
