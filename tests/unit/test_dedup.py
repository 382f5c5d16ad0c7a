"""Deduplication (data/prep/dedup.py): MinHash LSH against exact-Jaccard ground truth, global vs
per-dump scope, exact dedup, and the datatrove stages (worker-count independence, resume)."""
import hashlib
import json
import os
from collections import deque

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from ds_parallel.data.prep.dedup import (DedupConfig, JsonlShardWriter, MinHasher, build_dedup_executors,
                                         component_min, dedup_documents, exact_hash, run_dedup)
from ds_parallel.data.prep.synthetic import exact_jaccard, make_corpus, score_removal, threshold_scores
from ds_parallel.data.prep.words import normalize_text, split_words


@pytest.fixture(scope="module")
def corpus():
    c = make_corpus(seed=0, n_singletons=300, pairs_per_target=40, n_dumps=4)
    return c, exact_jaccard(c.texts, n=5)


@pytest.fixture(scope="module")
def small_corpus():
    return make_corpus(seed=1, n_singletons=40, pairs_per_target=8, n_dumps=3)


def test_near_duplicate_precision_recall_per_band(corpus):
    c, truth = corpus
    keep = dedup_documents(c.texts, c.dumps, c.sources, DedupConfig(mode="global")).keep
    rows = score_removal(keep, truth)
    print("\nband (exact J)   docs removed recall precision(>=lo)  LSH P(candidate), band mean")
    for row in rows:
        js = [v for v in truth.values() if row["lo"] <= v < row["hi"]]
        theory = np.mean([1 - (1 - v ** 8) ** 14 for v in js])
        print(f"{row['band']:15s} {row['docs']:5d} {row['removed']:6d} {row['recall']:6.3f} "
              f"{row['precision_at_lo']:9.3f}  {theory:.3f}")
        assert row["docs"] >= 30
        # the LSH S-curve 1 - (1 - J^8)^14: recall far off it means a biased signature
        assert abs(row["recall"] - theory) < 0.2, row
    recall, precision = threshold_scores(keep, truth, 0.9)
    print(f"J >= 0.9: recall {recall:.3f} precision {precision:.3f}")
    assert recall >= 0.95 and precision >= 0.99
    assert rows[0]["recall"] < 0.25  # J ~ 0.5 is not a duplicate for 14 x 8 bands
    assert rows[0]["false_positives"] == 0  # no unrelated document (or first of a pair) removed


def test_minhash_estimates_jaccard_without_bias(corpus):
    c, truth = corpus
    hasher = MinHasher(DedupConfig())
    sig, valid = hasher.signatures(c.texts)
    assert valid.all()
    err = np.array([(sig[i] == sig[j]).mean() - truth[min(i, j), max(i, j)] for i, j, _ in c.planted])
    # 112 hashes: sd of one estimate sqrt(J(1-J)/112) <= 0.047; the mean of 240 is ~0.003
    assert np.abs(err).mean() < 0.045 and abs(err.mean()) < 0.015, (np.abs(err).mean(), err.mean())


def test_global_mode_removes_cross_dump_duplicates_per_dump_keeps_them(corpus):
    c, truth = corpus
    keep_g = dedup_documents(c.texts, c.dumps, c.sources, DedupConfig(mode="global"))
    keep_d = dedup_documents(c.texts, c.dumps, c.sources, DedupConfig(mode="per_dump"))
    cross = [(i, j) for (i, j), v in truth.items() if v >= 0.9 and c.dumps[i] != c.dumps[j]]
    same = [(i, j) for (i, j), v in truth.items() if v >= 0.9 and c.dumps[i] == c.dumps[j]]
    assert len(cross) >= 40 and len(same) >= 40
    for res in (keep_g, keep_d):  # within a dump both modes remove the later copy
        assert all(res.keep[i] and not res.keep[j] for i, j in same)
    assert all(keep_g.keep[i] and not keep_g.keep[j] for i, j in cross)
    assert all(keep_d.keep[i] and keep_d.keep[j] for i, j in cross)
    same_truth = {p: v for p, v in truth.items() if c.dumps[p[0]] == c.dumps[p[1]]}
    recall, precision = threshold_scores(keep_d.keep, same_truth, 0.9)
    assert recall >= 0.95 and precision >= 0.99
    # DeepSeek LLM Table 1's shape: more dumps considered together, more removed
    rates = [r["rate"] for r in keep_g.report["dedup_rate_by_dumps"]]
    assert [r["dumps"] for r in keep_g.report["dedup_rate_by_dumps"]] == [1, 2, 3, 4]
    assert rates[-1] == pytest.approx((~keep_g.keep).mean()) and rates[-1] > rates[0]
    rate_d = keep_d.report["dedup_rate_by_dumps"][-1]["rate"]
    assert rate_d < rates[-1]
    print(f"\ndedup rate by dumps (global): {[round(r, 3) for r in rates]}; per-dump over all 4: {rate_d:.3f}")
    rep = keep_g.report
    assert rep["documents_in"] == len(c.texts) and rep["bytes_in"] == sum(len(t.encode()) for t in c.texts)
    removed = rep["steps"]["exact"]["removed"]["documents"] + rep["steps"]["minhash"]["removed"]["documents"]
    assert removed == rep["documents_in"] - rep["documents_kept"] == (~keep_g.keep).sum()
    assert sum(d["documents_kept"] for d in rep["per_dump"].values()) == rep["documents_kept"]


def test_exact_dedup_catches_whitespace_case_and_punctuation_variants():
    base = "The quick brown fox jumps over the lazy dog. It was not amused!"
    texts = [base,
             "the QUICK brown fox\n\njumps   over the lazy dog -- it was not amused",
             "  The quick brown fox jumps over the lazy dog. It was not amused!  ",
             "Ｔｈｅ ｑｕｉｃｋ brown fox jumps over the lazy dog. It was not amused!",  # full width: NFKC
             "The quick brown fox jumps over the lazy cat. It was not amused!",  # one word differs
             "快速的棕色狐狸。", "快速的棕色狐狸!!", "快速的棕色狐狸"]
    res = dedup_documents(texts, config=DedupConfig(mode="exact"))
    assert res.keep.tolist() == [True, False, False, False, True, True, False, False]
    assert res.report["steps"]["exact"]["removed"]["documents"] == 5
    assert res.report["steps"]["minhash"]["removed"]["documents"] == 0
    assert normalize_text(texts[3]) == "the quick brown fox jumps over the lazy dog it was not amused"
    # the key is BLAKE2b of the normalised UTF-8 text, independent of the process (no salted hash)
    want = int.from_bytes(hashlib.blake2b(normalize_text(base).encode(), digest_size=8).digest(), "little")
    assert exact_hash(texts[1]) == want
    assert split_words("Ünïcode, CJK: 日本語テキスト 한국") == ["ünïcode", "cjk", "日", "本", "語", "テ", "キ", "ス",
                                                              "ト", "한", "국"]


def test_component_min_matches_a_reference_search():
    rng = np.random.default_rng(0)
    n = 500
    u, v = rng.integers(0, n, 400), rng.integers(0, n, 400)
    adj = {i: set() for i in range(n)}
    for a, b in zip(u.tolist(), v.tolist()):
        adj[a].add(b)
        adj[b].add(a)
    want = np.empty(n, dtype=np.int64)
    seen = set()
    for s in range(n):  # breadth-first from each unseen node, in index order: its label is s
        if s in seen:
            continue
        q, comp = deque([s]), []
        seen.add(s)
        while q:
            x = q.popleft()
            comp.append(x)
            for y in adj[x] - seen:
                seen.add(y)
                q.append(y)
        want[comp] = s
    np.testing.assert_array_equal(component_min(n, u, v), want)
    chain = np.arange(999, 0, -1)  # a long path, worst case for label propagation
    assert (component_min(1000, chain, chain - 1) == 0).all()


def _u64(data):
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _fmix(x):
    m = (1 << 64) - 1
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 & m
    x ^= x >> 27
    x = x * 0x94D049BB133111EB & m
    return x ^ (x >> 31)


def test_signature_matches_a_python_integer_reference():
    """The vectorised signature against its definition in plain Python integers: BLAKE2b only,
    so also the same in every process (no salted `hash`)."""
    cfg, m = DedupConfig(n_grams=3, bands=4, rows=2, seed=7), (1 << 64) - 1
    text = "Alpha beta, gamma delta epsilon; zeta 日本語テキスト alpha beta gamma"
    const = {tag: [_u64(f"7:{tag}:{i}".encode()) | 1 for i in range(n)]
             for tag, n in (("ngram", 3), ("perm_a", 8), ("perm_b", 8), ("band", 2))}
    w = [_u64(x.encode()) for x in split_words(text)]
    shingles = [_fmix(sum(w[i + j] * const["ngram"][j] for j in range(3)) & m) for i in range(len(w) - 2)]
    want = [min((const["perm_a"][k] * x + const["perm_b"][k]) & m for x in shingles) for k in range(8)]
    hasher = MinHasher(cfg)
    sig, valid = hasher.signatures(["", text, "one two"])
    assert valid.tolist() == [False, True, True] and sig[1].tolist() == want
    bands = [_fmix(sum(want[2 * b + r] * const["band"][r] for r in range(2)) & m) for b in range(4)]
    assert hasher.band_keys(sig)[:, 1].tolist() == bands


class _ShardReader(PipelineStep):
    """Task r reads <folder>/<r>.jsonl (datatrove's JsonlReader needs orjson, not installed)."""

    name, type = "jsonl shard reader", "📖 - READER"

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank=0, world_size=1):
        with open(os.path.join(self.folder, f"{rank:05d}.jsonl")) as fh:
            for line in fh:
                d = json.loads(line)
                yield Document(text=d["text"], id=d["id"], metadata={"dump": d["dump"], "source": d["source"]})


def _write_shards(c, folder, n_shards):
    os.makedirs(folder)
    bounds = np.linspace(0, len(c.texts), n_shards + 1).astype(int)
    for s in range(n_shards):
        with open(os.path.join(folder, f"{s:05d}.jsonl"), "w") as fh:
            for i in range(bounds[s], bounds[s + 1]):
                fh.write(json.dumps({"id": f"doc{i}", "text": c.texts[i], "dump": c.dumps[i],
                                     "source": c.sources[i]}) + "\n")


def _run(c, tmp, n_shards, workers, **kw):
    inputs = os.path.join(tmp, "in")
    if not os.path.isdir(inputs):
        _write_shards(c, inputs, n_shards)
    out = os.path.join(tmp, f"out{workers}")
    report = run_dedup(_ShardReader(inputs), n_shards, os.path.join(tmp, f"work{workers}"),
                       DedupConfig(mode="global"), workers=workers, after_filter=[JsonlShardWriter(out)],
                       start_method="fork", **kw)
    files = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))} if report else None
    return report, files


def _kept_ids(files):
    return [json.loads(line)["id"] for data in files.values() for line in data.decode().splitlines()]


@pytest.fixture(scope="module")
def worker_runs(small_corpus, tmp_path_factory):
    """The same 5 input shards deduplicated through datatrove's executor with 1, 2, 4 workers."""
    tmp = str(tmp_path_factory.mktemp("dedup"))
    return tmp, {w: _run(small_corpus, tmp, 5, w) for w in (1, 2, 4)}


def test_executor_output_is_identical_for_1_2_4_workers(small_corpus, worker_runs):
    c, (_, runs) = small_corpus, worker_runs
    plain = dedup_documents(c.texts, c.dumps, c.sources, DedupConfig(mode="global"))
    report1, files1 = runs[1]
    assert list(files1) == [f"{s:05d}.jsonl" for s in range(5)]
    assert _kept_ids(files1) == [f"doc{i}" for i in plain.kept]
    assert report1 == json.loads(json.dumps(plain.report))
    assert report1["documents_kept"] < report1["documents_in"]
    for w in (2, 4):
        assert runs[w][0] == report1 and runs[w][1] == files1  # byte-identical shards


def test_interrupted_run_resumes_to_the_same_output(small_corpus, worker_runs, tmp_path):
    tmp, runs = str(tmp_path), worker_runs[1]
    os.symlink(os.path.join(worker_runs[0], "in"), os.path.join(tmp, "in"))
    assert _run(small_corpus, tmp, 5, 2, stop_after="signatures") == (None, None)  # "killed" after stage 1
    sig = os.path.join(tmp, "work2", "sigs", "00000.bands.npy")
    mtime = os.stat(sig).st_mtime_ns
    # a torn bucket file from the dead run, and no completion marker for it
    os.makedirs(os.path.join(tmp, "work2", "buckets"))
    with open(os.path.join(tmp, "work2", "buckets", "003.npz"), "wb") as fh:
        fh.write(b"PK\x03\x04 torn")
    report, files = _run(small_corpus, tmp, 5, 2)
    assert os.stat(sig).st_mtime_ns == mtime  # finished signature tasks were skipped
    assert (report, files) == runs[1]
    with pytest.raises(ValueError, match="work folder"):  # other settings never reuse stale stage files
        build_dedup_executors(_ShardReader(tmp), 5, os.path.join(tmp, "work2"), DedupConfig(rows=4))


def test_exact_mode_through_the_executor_skips_the_band_stage(small_corpus, worker_runs, tmp_path):
    c, tmp = small_corpus, str(tmp_path)
    os.symlink(os.path.join(worker_runs[0], "in"), os.path.join(tmp, "in"))
    config = DedupConfig(mode="exact")
    report = run_dedup(_ShardReader(os.path.join(tmp, "in")), 5, os.path.join(tmp, "work"), config,
                       after_filter=[JsonlShardWriter(os.path.join(tmp, "out"))])
    plain = dedup_documents(c.texts, c.dumps, c.sources, config)
    assert report == json.loads(json.dumps(plain.report)) and report["steps"]["exact"]["removed"]["documents"] > 0
    assert not os.path.exists(os.path.join(tmp, "work", "buckets"))
