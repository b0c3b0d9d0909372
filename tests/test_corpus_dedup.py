"""Deduplication: vectorised MinHash against a per-permutation loop, the sharded flow
(signatures -> buckets -> clusters -> filter) against the in-memory one."""
import random

import numpy as np

from phijax.hashing import mix64
from tools.corpus.dedup import (Clusters, DedupConfig, MinHasher, band_names, cluster,
                                find_duplicates, write_bucket_edges, write_signatures)
from tools.decontam import ngram_hashes

VOCAB = [f"w{i}" for i in range(3000)]


def doc(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def edit(text: str, k: int, seed: int = 0) -> str:
    words, rng = text.split(), random.Random(seed)
    for i in rng.sample(range(len(words)), k):
        words[i] = "changed"
    return " ".join(words)


def test_signatures_are_minima_of_each_permutation_and_estimate_jaccard():
    hasher = MinHasher(ngram=5, bands=14, rows=8, seed=3)
    texts = [doc(1), edit(doc(1), 6), doc(2), "two words"]
    sigs, has = hasher.signatures(texts)
    assert has.tolist() == [True, True, True, True]
    shingles = np.unique(ngram_hashes([texts[0]], 5)[0])
    naive = [int(min(mix64(shingles ^ s))) for s in hasher.seeds]
    assert sigs[0].tolist() == naive
    a, b = set(ngram_hashes([texts[0]], 5)[0]), set(ngram_hashes([texts[1]], 5)[0])
    true = len(a & b) / len(a | b)
    assert abs((sigs[0] == sigs[1]).mean() - true) < 0.12 and (sigs[0] == sigs[2]).mean() < 0.05
    assert hasher.band_hashes(sigs).shape == (4, 14)


def corpus():
    """Three shards: exact copies (case, spacing), near copies across shards, distinct docs."""
    base, other = doc(10), doc(11)
    shards = [[base, doc(12), other],
              [doc(13), "  " + base.upper().replace(" ", "\n "), edit(other, 4)],
              [edit(base, 3, 1), doc(14), other, "", ""]]
    return shards


def test_sharded_flow_matches_in_memory_dedup(tmp_path):
    shards = corpus()
    cfg = DedupConfig(partitions=3)
    sig, edges = tmp_path / "sig", tmp_path / "edges"
    edges.mkdir()
    for i, texts in enumerate(shards):
        write_signatures(texts, i, sig, cfg)
    for band in band_names(cfg):
        for part in range(cfg.partitions):
            write_bucket_edges(sig, len(shards), band, part, cfg.partitions, edges)
    report = cluster(edges, tmp_path)
    clusters = Clusters(tmp_path / "clusters.npz")
    ids = [(s << 32) | i for s, texts in enumerate(shards) for i in range(len(texts))]
    verdicts = dict(zip([(i >> 32, i & 0xFFFFFFFF) for i in ids], clusters.lookup(ids)))
    base_id, other_id, empty_id = 0, 2, (2 << 32) | 3
    assert verdicts[(0, 0)] == (base_id, None)  # each cluster keeps its first document
    assert verdicts[(1, 1)] == (base_id, "exact duplicate")
    assert verdicts[(2, 0)] == (base_id, "near duplicate")
    assert verdicts[(0, 2)] == (other_id, None)
    assert verdicts[(1, 2)] == (other_id, "near duplicate")
    assert verdicts[(2, 2)] == (other_id, "exact duplicate")
    assert verdicts[(2, 3)] == (empty_id, None) and verdicts[(2, 4)] == (empty_id,
                                                                         "exact duplicate")
    for key in [(0, 1), (1, 0), (2, 1)]:
        assert verdicts[key] == (-1, None)
    assert report == {"clusters": 3, "documents_in_clusters": 8, "removed": 5, "largest": 3,
                      "sizes": {2: 1, 3: 2}}
    # The in-memory dedup (the seeds') removes the same documents.
    flat = [t for texts in shards for t in texts]
    removed = {i for i, _, _ in find_duplicates(flat)}
    assert removed == {k for k, (_, why) in enumerate(verdicts.values()) if why}


def test_one_partition_gives_the_edges_of_many(tmp_path):
    shards = corpus()
    results = []
    for parts in (1, 5):
        cfg = DedupConfig(partitions=parts, exact=False)
        out = tmp_path / f"p{parts}"
        (out / "edges").mkdir(parents=True)
        for i, texts in enumerate(shards):
            write_signatures(texts, i, out / "sig", cfg)
        for band in band_names(cfg):
            for part in range(parts):
                write_bucket_edges(out / "sig", len(shards), band, part, parts, out / "edges")
        results.append(cluster(out / "edges", out))
        with np.load(out / "clusters.npz") as z:
            results.append((z["members"].tolist(), z["kept"].tolist()))
    assert results[0] == results[2] and results[1] == results[3]
