"""Mid-training: a source can keep only a store's long documents (windows come from those alone,
mixed exactly and resumed by step), a filter that leaves no window is one line before anything
compiles, the shipped mid-training configs keep tokens per step and take a tenth of the LR, and
the tiny model mid-trained at 4x its context starts fresh and learns its long windows."""
import math

import numpy as np
import pytest
import yaml

from conftest import ROOT, read_metrics, run_cli
from phijax.config import Config, load_config
from phijax.data.loader import Windows
from phijax.data.mixture import BlockMixer, load_mixture
from phijax.errors import DataError
from phijax.train.tasks import lm_task
from test_data import make_store, tokenizer  # noqa: F401 - a fixture

CONFIGS = ROOT / "configs"
# Short documents of letters between long ones of digits: no piece of a short one is a digit.
SHORT = ["ab cd ef", "gh ij kl mn", "op qr"]
LONG = [" ".join(str(1000 + 7 * i + k) for i in range(n)) for k, n in enumerate((60, 90, 75))]


@pytest.fixture(scope="module")
def mixed_store(tokenizer, tmp_path_factory):  # noqa: F811
    docs = [SHORT[0], LONG[0], LONG[1], SHORT[1], LONG[2], SHORT[2]]
    return make_store(tokenizer, tmp_path_factory.mktemp("stores") / "mixed", docs)


def _long_cut(store) -> int:
    """A length between the short documents' and the long ones'."""
    lengths = np.diff(store.offsets)
    short = lengths[[0, 3, 5]]
    assert short.max() < lengths[[1, 2, 4]].min()
    return int(lengths[[1, 2, 4]].min())


def test_select_reads_only_the_long_documents_back_to_back(mixed_store):
    store, cut = mixed_store, _long_cut(mixed_store)
    subset = store.select(cut)
    kept = [1, 2, 4]  # two runs of consecutive documents: 1-2 and 4
    pieces = [store.read(int(store.offsets[d]), int(store.offsets[d + 1])) for d in kept]
    assert subset.documents == 3 and len(subset) == sum(p.size for p in pieces)
    assert np.array_equal(subset.offsets, np.cumsum([0] + [p.size for p in pieces]))
    everything = np.concatenate(pieces)
    assert np.array_equal(subset.read(0, len(subset)), everything)
    for begin, end in [(3, 40), (pieces[0].size - 2, pieces[0].size + pieces[1].size + 5)]:
        assert np.array_equal(subset.read(begin, end), everything[begin:end])  # across runs
    assert subset.read_mask(0, 10) is None and store.select(None) is store
    assert store.select(int(np.diff(store.offsets).max()) + 1).documents == 0

    # Windows over the subset: its tokens only; positions restart at each kept document.
    seq = 32
    windows = Windows(subset, seq, 0, (len(subset) - 1) // seq)
    starts = set(subset.offsets[:-1].tolist())
    for i in range(len(windows)):
        w = windows[i]
        begin = i * seq
        assert np.array_equal(w["tokens"], everything[begin:begin + seq])
        for j in range(1, seq):
            restarts = begin + j in starts
            assert (w["positions"][j] == 0) == restarts
            assert w["segment_ids"][j] == w["segment_ids"][j - 1] + restarts


def _config(tmp_path, sources, tokenizer, seq_len=32) -> Config:  # noqa: F811
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({"sources": sources}))
    cfg = Config()
    cfg.model.vocab_size = 640
    cfg.data.mixture, cfg.data.tokenizer = str(mixture), str(tokenizer.path)
    cfg.data.cache_dir, cfg.data.seq_len, cfg.data.eval_fraction = str(tmp_path / "c"), seq_len, 0
    cfg.train.steps, cfg.train.batch_size = 12, 4
    return cfg


def test_a_filtered_source_trains_on_long_documents_exactly_and_resumes_by_step(
        tokenizer, mixed_store, tmp_path):  # noqa: F811
    store, cut = mixed_store, _long_cut(mixed_store)
    short_ids = set(store.read(0, int(store.offsets[1])).tolist()) - \
        set(store.read(int(store.offsets[1]), int(store.offsets[3])).tolist())
    assert short_ids  # pieces of the short documents no long one has
    cfg = _config(tmp_path, [{"name": "long", "share": 0.25, "store": str(store.path),
                              "min_doc_tokens": cut},
                             {"name": "all", "share": 0.75, "store": str(store.path)}], tokenizer)
    cfg.train.steps = 250  # 1,000 windows: one block of the mixer, exact in each source's share
    task = lm_task(cfg, None)
    long_windows = Windows(store.select(cut), 32, 0, (len(store.select(cut)) - 1) // 32)
    long_rows = {tuple(long_windows[i]["tokens"]) for i in range(len(long_windows))}
    mixer = BlockMixer([0.25, 0.75], cfg.data.seed)  # which rows are the long source's
    batches = list(task.data(0)[0])
    taken = 0
    for step, batch in enumerate(batches):
        for j, row in enumerate(batch["tokens"]):
            if mixer(step * 4 + j)[0] == 0:
                assert tuple(row) in long_rows and not short_ids & set(row.tolist())
                taken += 1
    assert taken == sum(task.sources_at(s)["long"] for s in range(250)) == 250  # a quarter
    resumed = next(task.data(7)[0])
    assert all(np.array_equal(resumed[k], batches[7][k]) for k in resumed)


@pytest.mark.parametrize("cut_from", ["longest", "window"])
def test_a_filter_that_leaves_no_window_names_the_source_and_the_filter(
        tokenizer, mixed_store, tmp_path, cut_from):  # noqa: F811
    store = mixed_store
    lengths = np.diff(store.offsets)
    if cut_from == "longest":  # no document is that long
        cut, seq_len = int(lengths.max()) + 1, 32
        expected = (f"source long: store {store.path} has no document of at least {cut} tokens "
                    f"(min_doc_tokens)")
    else:  # the long documents together are shorter than one window
        cut, seq_len = _long_cut(store), int(lengths[[1, 2, 4]].sum())
        expected = (f"source long: store {store.path} has {seq_len} tokens in its 3 documents "
                    f"of at least {cut} tokens (min_doc_tokens), fewer than one window "
                    f"(data.seq_len + 1 = {seq_len + 1} tokens)")
    cfg = _config(tmp_path, [{"name": "long", "share": 0.3, "store": str(store.path),
                              "min_doc_tokens": cut},
                             {"name": "all", "share": 0.7, "store": str(store.path)}],
                  tokenizer, seq_len=seq_len)
    with pytest.raises(DataError) as e:
        lm_task(cfg, None)  # before the trainer is built: nothing has compiled
    assert str(e.value) == expected


@pytest.mark.parametrize("name", ["phi-4", "tiny"])
def test_mid_training_configs_keep_tokens_per_step_and_take_a_tenth_of_the_lr(name):
    pre = load_config(CONFIGS / f"{name}.yaml")
    mid = load_config(CONFIGS / f"mid-train-{name}.yaml")
    assert mid.train.batch_size * mid.data.seq_len == pre.train.batch_size * pre.data.seq_len
    assert mid.data.seq_len == 4 * pre.data.seq_len <= mid.model.max_position_embeddings
    assert mid.optimizer.learning_rate == pytest.approx(pre.optimizer.learning_rate / 10)
    assert mid.model.rope_theta == 250_000.0 and mid.run.init_from
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    assert all(getattr(mid.model, k) == getattr(pre.model, k) for k in same)
    # 30% long documents, 70% the pre-training mixture in its own proportions
    mixture = load_mixture(mid.data.mixture)
    long = [s for s in mixture.sources if s.min_doc_tokens]
    assert sum(s.share for s in long) == pytest.approx(0.3)
    assert all(s.min_doc_tokens >= mid.data.seq_len // 2 for s in long)
    recall = {s.name: s.share for s in mixture.sources if not s.min_doc_tokens}
    pretraining = load_mixture(CONFIGS / "mixtures" / f"{name}.yaml").sources
    assert recall == pytest.approx({s.name: 0.7 * s.share for s in pretraining})


@pytest.mark.slow
def test_tiny_mid_training_starts_fresh_from_the_tiny_model_and_learns_long_windows(
        tiny_run, cache_dir, tmp_path):
    run = tmp_path / "mid"
    out = run_cli("train", CONFIGS / "mid-train-tiny.yaml", f"run.init_from={tiny_run}",
                  f"run.dir={run}", f"data.cache_dir={cache_dir}", "train.steps=20",
                  "train.log_every=1", "train.eval_every=1", "train.eval_batches=1",
                  "checkpoint.every=20")
    assert f"initialized from {tiny_run}" in out.stderr and "resumed" not in out.stderr
    metrics = read_metrics(run)
    first, last = metrics[0], metrics[-1]
    # A new run: step 1, the warm-up's first learning rate (a fresh optimizer state) ...
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert first["lr"] == pytest.approx(3e-4 / 5)
    # ... from the tiny model's parameters, not an initialization (ln 1024 = 6.93) ...
    assert first["loss"] < math.log(1024) - 0.5
    # ... whose held-out loss on 512-token windows, 30% from documents of 1,024+ tokens, falls.
    assert last["eval_loss"] < first["eval_loss"] - 0.05, (first, last)
    assert last["epochs/long-docs"] > 0 and "realized epochs per source: long-docs" in out.stderr
