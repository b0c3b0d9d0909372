"""Post-training: `phijax sft` and `phijax dpo` (the loss, the pairs, stored reference log-probs)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, read_metrics, run_cli
from phijax.config import DPOConfig
from phijax.errors import ConfigError, DataError
from phijax.posttrain.dpo import dpo_losses, load_pairs

TINY = ROOT / "configs" / "tiny.yaml"


def test_dpo_loss_equals_hand_computed_values():
    policy = jnp.array([[-1.0, -3.0], [-4.0, -2.0]])
    reference = jnp.array([[-2.0, -2.0], [-3.0, -3.0]])
    # m = (pi_c - ref_c) - (pi_r - ref_r): pair 0: 1 - (-1) = 2; pair 1: -1 - 1 = -2.
    loss, m = dpo_losses(policy, reference, DPOConfig(beta=0.5))
    np.testing.assert_allclose(m, [2.0, -2.0])
    np.testing.assert_allclose(loss, [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))],
                               rtol=1e-6)
    smooth, _ = dpo_losses(policy, reference, DPOConfig(beta=0.5, label_smoothing=0.1))
    np.testing.assert_allclose(smooth[0], 0.9 * math.log1p(math.exp(-1.0)) +
                               0.1 * math.log1p(math.exp(1.0)), rtol=1e-6)
    ipo, _ = dpo_losses(policy, reference, DPOConfig(beta=0.5, loss="ipo"))
    np.testing.assert_allclose(ipo, [(2.0 - 1.0) ** 2, (-2.0 - 1.0) ** 2], rtol=1e-6)
    beta2, _ = dpo_losses(policy, reference, DPOConfig(beta=2.0))
    np.testing.assert_allclose(beta2[0], math.log1p(math.exp(-4.0)), rtol=1e-6)
    # RPO: + alpha * (-log pi(chosen)) / chosen tokens; chosen of 2 and 1 tokens.
    rpo, _ = dpo_losses(policy, reference, DPOConfig(beta=0.5, rpo_alpha=0.5),
                        jnp.array([2.0, 1.0]))
    np.testing.assert_allclose(rpo, [math.log1p(math.exp(-1.0)) + 0.5 * 1.0 / 2,
                                     math.log1p(math.exp(1.0)) + 0.5 * 4.0 / 1], rtol=1e-6)


def _write_pairs(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_single_token_pairs_get_no_eos_and_weight_only_their_token(tmp_path):
    path = _write_pairs(tmp_path / "p.jsonl", [
        {"id": "a", "prompt_ids": [5, 6, 7], "chosen_ids": [9], "rejected_ids": [11]},
        {"id": "b", "prompt_ids": [5], "chosen_ids": [1, 2, 3], "rejected_ids": [4]}])
    pairs = load_pairs(path, vocab_size=32, seq_len=8)
    rows = pairs.rows(0, 8)
    for r, token in ((0, 9), (1, 11)):
        assert rows["tokens"][r, :3].tolist() == [5, 6, 7]
        w = rows["loss_weights"][r]
        assert w.sum() == 1.0 and rows["targets"][r, w > 0].tolist() == [token]
        assert rows["segment_ids"][r, 3:].tolist() == [1] * 5  # the rest is padding
    rows = pairs.rows(1, 8)
    assert rows["targets"][0, rows["loss_weights"][0] > 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("record, words", [
    ({"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]}, "chosen_ids must be a non-empty"),
    ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [99]}, "rejected_ids has ids outside"),
    ({"prompt_ids": [1] * 8, "chosen_ids": [2, 3], "rejected_ids": [2]}, "over data.seq_len"),
    ({"prompt_ids": [1], "chosen_ids": ["2"], "rejected_ids": [2]}, "list of token ids"),
])
def test_bad_pairs_are_named_by_file_and_line(tmp_path, record, words):
    good = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}
    path = _write_pairs(tmp_path / "p.jsonl", [good, record])
    with pytest.raises(DataError, match=f"p.jsonl:2: .*{words}"):
        load_pairs(path, vocab_size=32, seq_len=8)


# ---------------------------------------------------------------- end to end

def _chats(path, n=300):
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n"
        for a, b in zip(range(n), range(3, n + 3))))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir):
    """A tiny model pretrained briefly on chats: the checkpoint SFT and DPO start from."""
    tmp = tmp_path_factory.mktemp("base")
    chats = _chats(tmp / "chats.jsonl")
    run_dir = tmp / "base"
    run_cli("train", TINY, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
            f"data.corpus=[{chats}]", "data.mixture=null", "data.packing=documents",
            "data.tokenizer_vocab_size=320", "train.steps=20", "checkpoint.every=20")
    return run_dir, chats


@pytest.mark.slow
def test_sft_starts_from_the_checkpoint_and_trains_on_chats(base, tmp_path, cache_dir):
    base_dir, chats = base
    run_dir = tmp_path / "sft"
    run_cli("sft", TINY, f"run.dir={run_dir}", f"data.cache_dir={cache_dir}",
            f"run.init_from={base_dir}", f"data.corpus=[{chats}]", "data.mixture=null",
            "data.packing=documents", "train.steps=6", "train.log_every=1",
            "optimizer.warmup_steps=1")
    sft, pre = read_metrics(run_dir), read_metrics(base_dir)
    # The first SFT step starts where pretraining ended, not at a fresh model's loss.
    assert sft[0]["loss"] < 0.8 * pre[0]["loss"] and sft[-1]["step"] == 6
    assert (run_dir / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "plain text, not a chat"}) + "\n")
    for extra, words in (([], "run.init_from: sft fine-tunes a checkpoint"),
                         ([f"run.init_from={base_dir}", "data.packing=windows"],
                          "sft needs 'documents'"),
                         ([f"run.init_from={base_dir}", f"data.corpus=[{docs}]"],
                          "1 of 1 documents are not chats"),
                         ([f"run.init_from={base_dir}", "model.hidden_size=64"],
                          "model.hidden_size is 64 but run.init_from")):
        out = run_cli("sft", TINY, f"run.dir={tmp_path / 'bad'}", f"data.cache_dir={cache_dir}",
                      "data.mixture=null", f"data.corpus=[{chats}]", "data.packing=documents",
                      *extra, check=False)
        assert out.returncode == 2 and words in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("phijax: error: ")
        assert "Traceback" not in out.stderr
        assert not (tmp_path / "bad" / "checkpoints").exists()


def _pairs(base_dir, path):
    """Sequence pairs (right vs wrong sum) and single-token pairs, as token ids."""
    from phijax.data.tokenizer import Tokenizer
    tok = Tokenizer(base_dir / "tokenizer.model")
    records = []
    for a in range(40):
        prompt = tok.encode_prompt([{"role": "user", "content": f"What is {a} plus 7?"}])
        right = tok.encode([f"{a} plus 7 is {a + 7}."])[0] + [tok.im_end_id]
        wrong = tok.encode([f"{a} plus 7 is {a + 9}."])[0] + [tok.im_end_id]
        records.append({"id": f"s{a}", "prompt_ids": prompt, "chosen_ids": right,
                        "rejected_ids": wrong})
        records.append({"id": f"t{a}", "prompt_ids": prompt + right[:-3],
                        "chosen_ids": [right[-3]], "rejected_ids": [wrong[-3]]})
    return _write_pairs(path, records)


@pytest.mark.slow
def test_dpo_trains_on_stored_reference_logprobs(base, tmp_path, caplog):
    base_dir, _ = base
    pairs = _pairs(base_dir, tmp_path / "pairs.jsonl")
    run_dir = tmp_path / "dpo"
    common = (f"run.init_from={base_dir}", f"dpo.pairs={pairs}", "data.eval_fraction=0.1",
              "train.batch_size=8", "train.log_every=1", "train.eval_every=100",
              "optimizer.learning_rate=1e-3", "optimizer.warmup_steps=1", "dpo.beta=0.5")
    out = run_cli("dpo", TINY, f"run.dir={run_dir}", "train.steps=12", "checkpoint.every=6",
                  *common)
    assert "reference log-probs: computing for 80 pairs" in out.stderr
    metrics = read_metrics(run_dir)
    first, last = metrics[0], metrics[-1]
    # Step 1 is measured before any update: the policy is the reference, m = 0, loss = log 2.
    assert abs(first["loss"] - math.log(2)) < 1e-4 and abs(first["reward_margin"]) < 1e-4
    assert last["loss"] < first["loss"] and last["accuracy"] > 0.5
    for key in ("reward_margin", "accuracy", "chosen_logp", "rejected_logp", "eval_loss",
                "eval_accuracy"):
        assert key in last
    # The stored reference log-probs are the base model's sequence log-probs.
    stored = np.load(str(pairs) + ".ref.npz")["logps"]
    assert stored.shape == (80, 2)
    from phijax.posttrain.dpo import load_pairs as load
    from phijax.sampling import load_sampler
    sampler, _ = load_sampler(base_dir)
    p = load(pairs, 1024, 128)
    for i in (0, 1):  # a sequence pair and a single-token pair
        for r, completion in enumerate((p.chosen[i], p.rejected[i])):
            prompt = p.prompt[i].tolist()
            want = _logprob(sampler, prompt, completion.tolist())
            np.testing.assert_allclose(stored[i, r], want, rtol=1e-4, atol=1e-4)
    # Resuming to more steps reads the stored reference log-probs, never recomputes them.
    mtime = (tmp_path / "pairs.jsonl.ref.npz").stat().st_mtime_ns
    again = run_cli("dpo", TINY, f"run.dir={run_dir}", "train.steps=14", *common)
    assert "(stored; not recomputed)" in again.stderr and "computing" not in again.stderr
    assert "resumed from step 12" in again.stderr
    assert (tmp_path / "pairs.jsonl.ref.npz").stat().st_mtime_ns == mtime
    assert read_metrics(run_dir)[-1]["step"] == 14
    # The DPO run directory samples like any other.
    run_cli("sample", run_dir, "--prompt", "What is 3 plus 7?", "--max-new-tokens", 4)


def _logprob(sampler, prompt, completion) -> float:
    """log p(completion | prompt), one full forward pass per completion token."""
    total = 0.0
    for j, token in enumerate(completion):
        logits = _next_logits(sampler, prompt + completion[:j])
        total += float(jax.nn.log_softmax(logits)[token])
    return total


def _next_logits(sampler, ids):
    """The logits for the token after `ids` from the sampler's own model: its decode path,
    prefilling `ids` (the reference log-probs come from the training forward)."""
    from phijax.model import decoder_from_params, empty_caches
    model = decoder_from_params(sampler.cfg, sampler.params)
    logits, _ = model.decode(jnp.asarray([ids], jnp.int32), jnp.arange(len(ids))[None],
                             empty_caches(sampler.cfg, 1, len(ids)), 0, jnp.zeros(1, jnp.int32))
    return logits[0]


@pytest.mark.slow
def test_dpo_on_8_devices_matches_one_device(base, tmp_path):
    base_dir, _ = base
    pairs = _pairs(base_dir, tmp_path / "pairs.jsonl")
    losses = {}
    for devices, mesh in ((1, []), (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        run_dir = tmp_path / f"dpo{devices}"
        run_cli("dpo", TINY, f"run.dir={run_dir}", f"run.init_from={base_dir}",
                f"dpo.pairs={pairs}", "train.steps=3", "train.log_every=1", "train.batch_size=8",
                "data.eval_fraction=0", *mesh, devices=devices)
        losses[devices] = [m["loss"] for m in read_metrics(run_dir)]
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)
