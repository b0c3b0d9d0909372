"""Bad training data fails before anything compiles, naming the source: a store made with another
tokenizer or holding ids the model has no embedding for, a source smaller than one window, a
share too small to get a window in the run, a missing store or corpus. Eval leaves out (loudly)
a source too small to give eval windows. `data report` counts the tokens of corpus sources."""
import json
import logging

import pytest
import yaml

from conftest import ROOT, run_cli
from phijax.config import Config, load_config
from phijax.data.corpus import documents
from phijax.data.mixture import _human
from phijax.data.prepare import prepare
from phijax.data.store import TokenStore, build_store
from phijax.data.tokenizer import Tokenizer, train_tokenizer
from phijax.errors import ConfigError, DataError
from phijax.train.tasks import lm_task
from test_data import make_store


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A 640-piece tokenizer (the stores' and most runs') and another of 512 pieces."""
    tmp = tmp_path_factory.mktemp("tok")
    return [Tokenizer(train_tokenizer(documents(["builtin:python-docs"]), tmp / f"sp{n}",
                                      vocab_size=n)) for n in (600, 400)]


@pytest.fixture(scope="module")
def docs_store(tokenizers, tmp_path_factory):
    """The python-docs corpus as a store made with the 640-piece tokenizer."""
    out = tmp_path_factory.mktemp("stores") / "docs"
    return TokenStore(build_store(["builtin:python-docs"], tokenizers[0], out, workers=1))


def _config(tmp_path, sources: list[dict], tokenizer, **data) -> Config:
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({"sources": sources}))
    cfg = Config()
    cfg.model.vocab_size = 640
    cfg.data.mixture, cfg.data.tokenizer = str(mixture), str(tokenizer.path)
    cfg.data.cache_dir, cfg.data.seq_len = str(tmp_path / "cache"), 32
    cfg.train.steps, cfg.train.batch_size = 20, 8
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _error(cfg: Config, kind=DataError) -> str:
    with pytest.raises(kind) as e:
        lm_task(cfg, None)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- the tokenizer and the ids

def test_a_store_records_its_tokenizer_and_its_largest_id(tokenizers, docs_store, tmp_path):
    m = docs_store.manifest
    assert m["tokenizer_hash"] == tokenizers[0].hash
    assert m["max_id"] == docs_store.max_id == int(docs_store.read(0, len(docs_store)).max())
    # A store from before `max_id`: read from its tokens, and written in by the next build.
    old = make_store(tokenizers[0], tmp_path / "old", ["alpha beta gamma " * 20])
    manifest = json.loads((old.path / "manifest.json").read_text())
    expected = manifest.pop("max_id")
    (old.path / "manifest.json").write_text(json.dumps(manifest))
    assert TokenStore(old.path).max_id == expected
    build_store([str(tmp_path / "old.jsonl")], tokenizers[0], old.path, workers=1)
    assert json.loads((old.path / "manifest.json").read_text())["max_id"] == expected


def test_a_store_made_with_another_tokenizer_is_an_error(tokenizers, docs_store, tmp_path):
    cfg = _config(tmp_path, [{"name": "docs", "share": 1.0, "store": str(docs_store.path)}],
                  tokenizers[1])
    message = _error(cfg)
    assert message.startswith(f"source docs: store {docs_store.path} was made with tokenizer "
                              f"{tokenizers[0].path}")
    assert f"not the run's {tokenizers[1].path}" in message


def test_ids_at_or_above_vocab_size_fail_before_the_run_directory(tokenizers, docs_store,
                                                                  tmp_path):
    # The run's tokenizer has 512 pieces, as does the model; the store has ids up to ~600.
    assert docs_store.max_id >= 512
    cfg = _config(tmp_path, [{"name": "docs", "share": 1.0, "store": str(docs_store.path)}],
                  tokenizers[1])
    run_dir = tmp_path / "run"
    out = run_cli("train", ROOT / "configs" / "tiny.yaml", f"data.mixture={cfg.data.mixture}",
                  f"data.tokenizer={tokenizers[1].path}", "model.vocab_size=512",
                  f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}", check=False)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == (f"phijax: error: source docs: store {docs_store.path} holds token ids up to "
                    f"{docs_store.max_id}, not all below model.vocab_size 512 (it was made with "
                    f"tokenizer {tokenizers[0].path}, not the run's {tokenizers[1].path})")
    assert not run_dir.exists() and "Traceback" not in out.stderr


# ---------------------------------------------------------------- mixture edge cases

def test_a_source_smaller_than_one_window_is_an_error(tokenizers, docs_store, tmp_path):
    small = make_store(tokenizers[0], tmp_path / "small", ["a b c"])
    cfg = _config(tmp_path, [{"name": "docs", "share": 0.5, "store": str(docs_store.path)},
                             {"name": "small", "share": 0.5, "store": str(small.path)}],
                  tokenizers[0])
    assert _error(cfg) == (f"source small: store {small.path} has {len(small)} tokens, fewer "
                           f"than one window (data.seq_len + 1 = 33 tokens)")


def test_a_share_that_gets_no_window_in_the_run_is_an_error(tokenizers, docs_store, tmp_path):
    other = make_store(tokenizers[0], tmp_path / "other", ["one two three " * 200])
    cfg = _config(tmp_path, [{"name": "docs", "share": 0.995, "store": str(docs_store.path)},
                             {"name": "rare", "share": 0.005, "store": str(other.path)}],
                  tokenizers[0])
    cfg.train.steps, cfg.train.batch_size = 2, 8  # 16 windows; rare has 5 in each 1000
    assert _error(cfg, ConfigError) == (
        "source rare: share 0.005 gives it no window in the run's 16 windows (train.steps 2 x "
        "train.batch_size 8); raise its share or train.steps")
    cfg.train.steps = 200  # 1,600 windows: rare gets some
    lm_task(cfg, None)


def test_a_share_below_one_window_per_block_names_the_source(tokenizers, docs_store, tmp_path):
    cfg = _config(tmp_path, [{"name": "docs", "share": 0.9996, "store": str(docs_store.path)},
                             {"name": "tiny", "share": 0.0004, "store": str(docs_store.path)}],
                  tokenizers[0])
    assert _error(cfg, ConfigError).startswith("source tiny: share 0.0004 gives it no window in "
                                               "a block of 1000 windows")


@pytest.mark.parametrize("kind", ["store", "corpus"])
def test_a_missing_store_or_corpus_names_the_source_and_the_path(tokenizers, tmp_path, kind):
    missing = tmp_path / "data" / "code-store"
    source = {"name": "code", "share": 1.0,
              kind: str(missing) if kind == "store" else [str(missing)]}
    message = _error(_config(tmp_path, [source], tokenizers[0]),
                     DataError if kind == "store" else ConfigError)
    assert message == (f"source code: store {missing} does not exist (no manifest.json)"
                       if kind == "store" else f"source code: corpus {missing} does not exist")
    missing.mkdir(parents=True)
    if kind == "store":
        assert _error(_config(tmp_path, [source], tokenizers[0])) == (
            f"source code: store {missing} is not a token store (no manifest.json)")
        missing.rmdir()
        (missing.parent / "code-store.partial").mkdir()  # a `data tokenize` that was killed
        assert _error(_config(tmp_path, [source], tokenizers[0])) == (
            f"source code: store {missing} does not exist (no manifest.json); its tokenizing "
            f"did not finish (rerun `phijax data tokenize` to resume it)")


def test_a_missing_store_fails_train_before_the_run_directory(tmp_path):
    mixture = tmp_path / "m.yaml"
    mixture.write_text(f"sources:\n  - {{name: code, share: 1.0, store: {tmp_path / 'nope'}}}\n")
    out = run_cli("train", ROOT / "configs" / "tiny.yaml", f"data.mixture={mixture}",
                  f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}",
                  check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"phijax: error: source code: store {tmp_path / 'nope'} does not exist (no manifest.json)")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- eval and per-step sources

def test_eval_runs_on_the_sources_that_have_eval_windows(tokenizers, docs_store, tmp_path,
                                                         caplog):
    small = make_store(tokenizers[0], tmp_path / "small", ["word " * 80])
    cfg = _config(tmp_path, [{"name": "docs", "share": 0.7, "store": str(docs_store.path)},
                             {"name": "small", "share": 0.3, "store": str(small.path)}],
                  tokenizers[0], eval_fraction=0.1)
    windows = (len(small) - 1) // 32
    assert 0 < windows < 10  # int(0.1 * windows) is 0: no eval window
    with caplog.at_level(logging.WARNING, logger="phijax"):
        task = lm_task(cfg, None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"source small: its {windows} windows give no eval window at "
                        f"data.eval_fraction 0.1 (it needs 10); eval leaves it out"]
    _, evals, _ = task.data(0)
    assert len(evals) == cfg.train.eval_batches
    small_ids = set(small.read(0, len(small)).tolist())
    for batch in evals:  # only docs windows: none is all "word" tokens
        assert all(not set(row.tolist()) <= small_ids for row in batch["tokens"])
    # No source with eval windows: eval is off, and a warning says why.
    caplog.clear()
    cfg = _config(tmp_path, [{"name": "small", "share": 1.0, "store": str(small.path)}],
                  tokenizers[0], eval_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="phijax"):
        task = lm_task(cfg, None)
    assert [r.getMessage() for r in caplog.records] == [
        f"eval is off: no source gives an eval window at data.eval_fraction 0.1 (small: "
        f"{windows} windows; a source needs 10)"]
    assert task.data(0)[1] == []


def test_sources_at_counts_each_sources_windows_in_a_step(tokenizers, docs_store, tmp_path):
    other = make_store(tokenizers[0], tmp_path / "other", ["one two three " * 200])
    cfg = _config(tmp_path, [{"name": "docs", "share": 0.75, "store": str(docs_store.path)},
                             {"name": "other", "share": 0.25, "store": str(other.path)}],
                  tokenizers[0])
    task = lm_task(cfg, None)
    other_ids = set(other.read(0, len(other)).tolist()) - {tokenizers[0].eos_id}
    it = task.data(0)[0]
    total = {"docs": 0, "other": 0}
    for step in range(cfg.train.steps):
        counts = task.sources_at(step)
        assert sum(counts.values()) == cfg.train.batch_size
        rows = next(it)["tokens"]
        assert counts["other"] == sum(set(r.tolist()) <= other_ids for r in rows)
        total = {k: total[k] + v for k, v in counts.items()}
    assert total == {"docs": 120, "other": 40}
    cfg.data.synthetic = True
    assert lm_task(cfg, None).sources_at(3) == {}


# ---------------------------------------------------------------- data report

def test_report_counts_the_tokens_of_corpus_sources(cache_dir, caplog):
    """`data report` on a mixture of corpora builds (or reuses) the stores training uses."""
    tiny = ROOT / "configs" / "mixtures" / "tiny.yaml"
    args = ("data", "report", tiny, "--tokens", "1M", "--config", ROOT / "configs" / "tiny.yaml",
            f"data.cache_dir={cache_dir}")
    out = run_cli(*args)
    assert "source python-docs: counting the tokens of corpus builtin:python-docs" in out.stderr
    # The stdlib store is built here or, when an earlier test built it, found up to date.
    assert "tokenize source python-stdlib" in out.stderr or "is up to date" in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "plan for 1M training tokens"
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["python-docs", "python-stdlib"]
    # The same stores as training builds: preparing the run finds them up to date.
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"data.cache_dir={cache_dir}", f"data.mixture={tiny}"])
    with caplog.at_level(logging.INFO, logger="phijax"):
        _, mixture, stores = prepare(cfg.data)
    assert caplog.text.count("is up to date") == 2 and "training a" not in caplog.text
    for source, store in zip(mixture.sources, stores):
        share, unique, seen, epochs = rows[source.name][1:]
        assert share == f"{source.share:.1%}" and unique == _human(len(store))
        assert float(epochs) == pytest.approx(source.share * 1e6 / len(store), abs=0.05)
    again = run_cli(*args)  # from the cache: nothing is tokenized
    assert again.stdout == out.stdout and "tokenize source" not in again.stderr
