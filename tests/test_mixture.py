"""Mixture config, the planning report (Table 5) and the exact block mixer."""
import numpy as np
import pytest

from conftest import ROOT, run_cli
from phijax.errors import ConfigError
from phijax.data.mixture import BlockMixer, block_counts, load_mixture, plan

PHI4 = ROOT / "configs" / "mixtures" / "phi-4.yaml"


def test_report_reproduces_table_5_epochs():
    rows = plan(load_mixture(PHI4), 10e12)
    assert [r["source"] for r in rows] == ["web", "web-rewrites", "synthetic", "code", "acquired"]
    assert [round(r["epochs"], 1) for r in rows] == [1.2, 5.2, 13.8, 2.4, 1.7]
    out = run_cli("data", "report", PHI4, "--tokens", "10T").stdout
    assert "synthetic" in out and "13.8" in out and "warning" not in out
    assert "warning: source synthetic repeats 41.4 times" in run_cli(
        "data", "report", PHI4, "--tokens", "30T").stdout


@pytest.mark.parametrize("body,message", [
    ("sources:\n  - {name: a, share: 0.5}\n  - {name: b, share: 0.4}\n",
     "mixture shares sum to 0.9, not 1 (a=0.5, b=0.4)"),
    ("sources:\n  - {name: a, share: 1.2}\n  - {name: b, share: -0.2}\n",
     "source b: share must be positive, got -0.2"),
    ("sources:\n  - {name: a, shar: 1.0}\n",
     "unknown key sources[0].shar (did you mean sources[0].share?)"),
    ("sources: []\n", "'sources' must be a non-empty list"),
])
def test_bad_mixtures_fail_in_one_line(tmp_path, body, message):
    path = tmp_path / "m.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_mixture(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("shares", [[0.15, 0.15, 0.40, 0.20, 0.10], [0.97, 0.02, 0.01]])
def test_block_mixer_realizes_shares_exactly(shares):
    mixer = BlockMixer(shares, seed=3, block=1000)
    n = 2000 * 8  # 2,000 batches of 8 windows
    sources = np.array([mixer(i)[0] for i in range(n)])
    realized = np.bincount(sources, minlength=len(shares)) / n
    np.testing.assert_allclose(realized, shares, atol=0.005)


def test_block_mixer_visits_each_source_stream_once_in_order_and_reshuffles():
    mixer = BlockMixer([0.6, 0.3, 0.1], seed=0, block=100)
    picks = [mixer(i) for i in range(500)]
    for source, count in enumerate(block_counts([0.6, 0.3, 0.1], 100)):
        local = [j for s, j in picks if s == source]
        assert local == list(range(5 * count))  # in stream order, none skipped or repeated
    first, second = [s for s, _ in picks[:100]], [s for s, _ in picks[100:200]]
    assert first != second and sorted(first) == sorted(second)
    again = BlockMixer([0.6, 0.3, 0.1], seed=0, block=100)
    assert [again(i) for i in range(250, 300)] == picks[250:300]  # from (seed, index) alone
    assert [BlockMixer([0.6, 0.3, 0.1], seed=1, block=100)(i) for i in range(100)] != picks[:100]


def test_consumed_counts_match_the_stream():
    mixer = BlockMixer([0.5, 0.3, 0.2], seed=4, block=100)
    sources = [mixer(i)[0] for i in range(350)]
    for n in (0, 1, 99, 100, 137, 350):
        np.testing.assert_array_equal(mixer.consumed(n), np.bincount(sources[:n], minlength=3))
