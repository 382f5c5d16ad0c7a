"""Exact and near-duplicate (MinHash LSH) deduplication, global or per dump, as datatrove steps.

DeepSeek LLM (arXiv:2401.02954 §2.1) deduplicates across all 91 Common Crawl dumps at once
and removes about four times more documents than deduplicating within one dump (its Table 1:
22.2% for 1 dump, 89.8% for 91); FineWeb deduplicates each dump on its own. Both are here:
`mode="global"` lets any two documents collide, `mode="per_dump"` only documents with the same
`metadata["dump"]`; `mode="exact"` runs the exact stage alone.

**Exact.** Key = 64-bit BLAKE2b of `words.normalize_text(text)` (NFKC, lowercase, no
punctuation, single spaces), so case, whitespace and punctuation variants collide.

**MinHash** (Broder 1997). A document is the set S of its word n-grams (`words.split_words`,
n = `n_grams`, default 5 as FineWeb). For K = bands x rows hash functions h_k,
sig_k = min_{s in S} h_k(s), and P[sig_k(A) == sig_k(B)] = |A ∩ B| / |A ∪ B| = J(A, B).
Every hash is stable across processes and machines (Python's `hash` is salted): a word hashes
to the first 8 bytes of its BLAKE2b (cached per word), an n-gram to a polynomial of its
words' hashes with the splitmix64 finaliser, and h_k(x) = a_k * x + b_k mod 2^64 with odd
a_k (multiply-add, Dietzfelbinger 1996) whose high bits decide the minimum. The K hashes
of all n-grams of a batch of documents are one (n_shingles, K) numpy product and a
`minimum.reduceat`, not a Python loop per n-gram.

**LSH.** The K values form `bands` bands of `rows` rows; a band hashes to one 64-bit key, and
two documents are candidates if any band key is equal: P = 1 - (1 - J^rows)^bands (14 x 8,
FineWeb's default: 0.92 at J=0.8, 0.9996 at 0.9, 0.05 at 0.5). Candidates are not re-checked.

**Clustering without one big task.** Each band is an independent task: it sorts the band keys
of all documents and writes its buckets (documents sharing a key) in `buckets/<band>.npz`. The
merge task reads every band's buckets and the exact-hash groups, links each bucket's members to
its first member, and finds connected components by min-label propagation with pointer jumping
(union-find without a Python loop per edge). **Keep rule:** in each component keep the document
with the smallest global index, index = (input shard, position in shard), i.e. input order. It
depends on the input only, so 1, 2 or 64 workers keep the same set.

**Stages** (datatrove steps, run by `LocalPipelineExecutor` or the Slurm executor):

    signatures  one task per input shard  -> sigs/<shard>.bands.npy (bands, docs) uint64 band keys
                                             sigs/<shard>.meta.npz  exact hash, bytes, dump, source
    buckets     one task per band         -> buckets/<band>.npz    (members, group)
    merge       one task                  -> removed/<shard>.npy, report.json
    filter      one task per input shard  -> the kept documents, to any writer

A shard is a task rank, so the reader in front of `signatures` and `filter` must give a rank
the same documents in the same order (datatrove readers do: task r reads files r, r + W, ...;
run both stages with the same task count). `filter` checks each document's byte length
against the signature stage's and fails loudly on a mismatch. Every file is written
atomically (ds_parallel/atomic.py); datatrove's completion markers let a rerun skip finished
tasks, and an unfinished task rewrites its files whole.

**Report** (`report.json`, also returned): documents and bytes in, removed by the exact and by
the MinHash step, kept per dump and source, and `dedup_rate_by_dumps`: the share removed when
deduplicating over the first 1, 2, ..., k dumps (dumps in input order), DeepSeek LLM Table 1's
shape.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from ds_parallel.atomic import atomic_open, write_atomic
from ds_parallel.data.prep.words import normalize_text, split_words

MODES = ("global", "per_dump", "exact")
_M64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class DedupConfig:
    mode: str = "global"
    n_grams: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"dedup.mode={self.mode!r} is not one of {MODES}")
        for name in ("n_grams", "bands", "rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"dedup.{name}={getattr(self, name)} must be >= 1")

    @property
    def n_perm(self) -> int:
        return self.bands * self.rows


# ----------------------------------------------------------------------------- hashing
def _stable_u64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _constants(seed: int, tag: str, n: int) -> np.ndarray:
    """n odd 64-bit constants from BLAKE2b(seed, tag, i): identical on every machine and numpy."""
    return np.array([_stable_u64(f"{seed}:{tag}:{i}".encode()) | 1 for i in range(n)], dtype=np.uint64)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _WordHashes(dict):
    """word -> stable 64-bit hash, computed once per distinct word (natural text is Zipfian,
    so almost every lookup hits); cleared when it grows past `limit` to bound memory."""

    def __init__(self, limit: int = 1 << 20):
        super().__init__()
        self.limit = limit

    def __missing__(self, word: str) -> int:
        if len(self) >= self.limit:
            self.clear()
        value = self[word] = _stable_u64(word.encode("utf-8"))
        return value


def exact_hash(text: str) -> int:
    """64-bit key of exact deduplication."""
    return _stable_u64(normalize_text(text).encode("utf-8"))


class MinHasher:
    """Word n-gram MinHash signatures and LSH band keys (see the module docstring)."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.words = _WordHashes()
        self.ngram_mul = _constants(config.seed, "ngram", config.n_grams)  # position weights
        self.a = _constants(config.seed, "perm_a", config.n_perm)  # (K,) odd multipliers
        self.b = _constants(config.seed, "perm_b", config.n_perm)
        self.band_mul = _constants(config.seed, "band", config.rows)

    def shingles(self, text: str) -> np.ndarray:
        """(n_shingles,) uint64 hashes of the word n-grams; a text of fewer than n words is one
        n-gram of all its words, a text without words has none."""
        words = split_words(text)
        h = np.fromiter(map(self.words.__getitem__, words), dtype=np.uint64, count=len(words))
        n = min(self.config.n_grams, len(words))
        if n == 0:
            return h
        acc = h[: len(h) - n + 1] * self.ngram_mul[0]
        for j in range(1, n):
            acc += h[j: len(h) - n + 1 + j] * self.ngram_mul[j]
        return _fmix64(acc)

    def signatures(self, texts: list[str], chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(D, K) uint64 MinHash signatures and a (D,) mask of texts that have words (the rest
        get all-ones rows and must not enter LSH)."""
        sig = np.full((len(texts), self.config.n_perm), _M64, dtype=np.uint64)
        shingles = [self.shingles(t) for t in texts]
        valid = np.array([len(s) > 0 for s in shingles], dtype=bool)
        i = 0
        while i < len(texts):  # batches of documents with about `chunk` n-grams in all
            j, total = i, 0
            while j < len(texts) and (j == i or total + len(shingles[j]) <= chunk):
                total += len(shingles[j])
                j += 1
            docs = [d for d in range(i, j) if valid[d]]
            if docs:
                x = np.concatenate([shingles[d] for d in docs])
                starts = np.cumsum([0] + [len(shingles[d]) for d in docs[:-1]])
                hk = np.multiply.outer(x, self.a)  # (S, K): h_k(x) = a_k x + b_k mod 2^64
                hk += self.b
                sig[docs] = np.minimum.reduceat(hk, starts, axis=0)
            i = j
        return sig, valid

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(D, K) signatures -> (bands, D) band keys, one 64-bit hash of each band's `rows` values."""
        d = sig.shape[0]
        rows = sig.reshape(d, self.config.bands, self.config.rows)
        return np.ascontiguousarray(_fmix64((rows * self.band_mul).sum(axis=2, dtype=np.uint64)).T)


# ----------------------------------------------------------------------------- shard arrays
@dataclass
class ShardSignatures:
    """What the signature stage keeps of one shard's D documents."""

    bands: np.ndarray  # (bands, D) uint64 LSH keys; (0, D) in exact mode
    valid: np.ndarray  # (D,) bool: has words (enters LSH)
    exact: np.ndarray  # (D,) uint64
    nbytes: np.ndarray  # (D,) int64 UTF-8 bytes
    dump_names: list[str] = field(default_factory=list)
    dump_idx: np.ndarray = None  # (D,) int32 index into dump_names
    source_names: list[str] = field(default_factory=list)
    source_idx: np.ndarray = None

    def __len__(self) -> int:
        return len(self.exact)

    def save(self, prefix: str) -> None:
        with atomic_open(prefix + ".bands.npy", "wb") as fh:
            np.save(fh, self.bands)
        with atomic_open(prefix + ".meta.npz", "wb") as fh:
            np.savez(fh, valid=self.valid, exact=self.exact, nbytes=self.nbytes, dump_idx=self.dump_idx,
                     source_idx=self.source_idx, dump_names=np.array(self.dump_names, dtype=str),
                     source_names=np.array(self.source_names, dtype=str))

    @classmethod
    def load(cls, prefix: str, band: int | None = None) -> "ShardSignatures":
        """`band`: read only that band's row (memory-mapped) instead of all of them."""
        bands = np.load(prefix + ".bands.npy", mmap_mode="r", allow_pickle=False)
        bands = np.array(bands[band: band + 1] if band is not None else bands)
        with np.load(prefix + ".meta.npz", allow_pickle=False) as z:
            return cls(bands=bands, valid=z["valid"], exact=z["exact"], nbytes=z["nbytes"],
                       dump_names=z["dump_names"].tolist(), dump_idx=z["dump_idx"],
                       source_names=z["source_names"].tolist(), source_idx=z["source_idx"])


def _codes(values: list[str]) -> tuple[list[str], np.ndarray]:
    names: dict[str, int] = {}
    idx = np.array([names.setdefault(v, len(names)) for v in values], dtype=np.int32)
    return list(names), idx


def shard_signatures(texts: list[str], dumps: list[str], sources: list[str], config: DedupConfig,
                     hasher: MinHasher | None = None) -> ShardSignatures:
    hasher = hasher or MinHasher(config)
    if config.mode == "exact":
        bands, valid = np.zeros((0, len(texts)), dtype=np.uint64), np.zeros(len(texts), dtype=bool)
    else:
        sig, valid = hasher.signatures(texts)
        bands = hasher.band_keys(sig)
    dump_names, dump_idx = _codes(dumps)
    source_names, source_idx = _codes(sources)
    return ShardSignatures(
        bands=bands, valid=valid, exact=np.array([exact_hash(t) for t in texts], dtype=np.uint64),
        nbytes=np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
        dump_names=dump_names, dump_idx=dump_idx, source_names=source_names, source_idx=source_idx)


def concat_shards(shards: list[ShardSignatures]) -> ShardSignatures:
    """One corpus-wide view, global index = (shard, position) order; dump and source names
    renumbered in order of first appearance."""
    out = {}
    for kind in ("dump", "source"):
        names: dict[str, int] = {}
        parts = []
        for s in shards:
            remap = np.array([names.setdefault(n, len(names)) for n in getattr(s, kind + "_names")], dtype=np.int32)
            parts.append(remap[getattr(s, kind + "_idx")] if len(remap) else getattr(s, kind + "_idx"))
        out[kind + "_names"], out[kind + "_idx"] = list(names), np.concatenate(parts).astype(np.int32)
    return ShardSignatures(bands=np.concatenate([s.bands for s in shards], axis=1),
                           valid=np.concatenate([s.valid for s in shards]),
                           exact=np.concatenate([s.exact for s in shards]),
                           nbytes=np.concatenate([s.nbytes for s in shards]), **out)


# ----------------------------------------------------------------------------- clustering
def bucket_groups(keys: np.ndarray, valid: np.ndarray, scope: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Documents sharing a key (and a scope: the dump in per-dump mode).

    Returns (members, group): global indices of every document in a group of >= 2, sorted by
    (group, index), and each one's group number."""
    idx = np.flatnonzero(valid)
    scope = np.zeros(len(keys), dtype=np.int64) if scope is None else scope
    order = np.lexsort((idx, keys[idx], scope[idx]))  # primary: scope, then key, then index
    idx = idx[order]
    k, s = keys[idx], scope[idx]
    new = np.ones(len(idx), dtype=bool)
    new[1:] = (k[1:] != k[:-1]) | (s[1:] != s[:-1])
    gid = np.cumsum(new) - 1
    multi = np.bincount(gid)[gid] >= 2 if len(gid) else np.zeros(0, dtype=bool)
    _, group = np.unique(gid[multi], return_inverse=True)
    return idx[multi].astype(np.int64), group.astype(np.int64)


def group_edges(members: np.ndarray, group: np.ndarray, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Edges (first member, other member) of each group, among the documents in `subset`."""
    if subset is not None:
        m = subset[members]
        members, group = members[m], group[m]
    first = np.ones(len(group), dtype=bool)
    first[1:] = group[1:] != group[:-1]
    head = members[first][np.cumsum(first) - 1]
    return head[~first], members[~first]


def component_min(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """label[i] = the smallest index in i's connected component of the graph (range(n), u-v).

    Min-label propagation: hook the root of each edge's larger label onto the smaller, then
    jump pointers to the root; labels only decrease and always name a node of the component,
    so at the fixed point each component's label is its minimum (which labels itself)."""
    label = np.arange(n, dtype=np.int64)
    while True:
        lu, lv = label[u], label[v]
        if np.array_equal(lu, lv):
            return label
        m = np.minimum(lu, lv)
        np.minimum.at(label, lu, m)
        np.minimum.at(label, lv, m)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped


def _removed(corpus: ShardSignatures, buckets: list[tuple[np.ndarray, np.ndarray]], exact_groups, subset):
    """(removed, removed_by_exact) masks over the corpus for the documents in `subset`."""
    eu, ev = group_edges(*exact_groups, subset)
    by_exact = np.zeros(len(corpus), dtype=bool)
    by_exact[ev] = True
    us, vs = [eu], [ev]
    for members, group in buckets:
        u, v = group_edges(members, group, subset)
        us.append(u)
        vs.append(v)
    label = component_min(len(corpus), np.concatenate(us), np.concatenate(vs))
    removed = label != np.arange(len(corpus))
    return removed, by_exact


def merge_duplicates(corpus: ShardSignatures, buckets: list[tuple[np.ndarray, np.ndarray]],
                     config: DedupConfig) -> tuple[np.ndarray, dict]:
    """Keep mask over the corpus and the report (see the module docstring)."""
    scope = corpus.dump_idx if config.mode == "per_dump" else None
    exact_groups = bucket_groups(corpus.exact, np.ones(len(corpus), dtype=bool), scope)
    removed, by_exact = _removed(corpus, buckets, exact_groups, None)

    def counts(mask):
        return {"documents": int(mask.sum()), "bytes": int(corpus.nbytes[mask].sum())}

    keep = ~removed
    report = {
        "mode": config.mode, "config": vars(config).copy(),
        "documents_in": len(corpus), "bytes_in": int(corpus.nbytes.sum()),
        "documents_kept": int(keep.sum()), "bytes_kept": int(corpus.nbytes[keep].sum()),
        "steps": {"exact": {"removed": counts(by_exact)},
                  "minhash": {"removed": counts(removed & ~by_exact)}},
        "per_dump": {}, "per_source": {}, "dedup_rate_by_dumps": [],
    }
    for kind in ("dump", "source"):
        idx = getattr(corpus, kind + "_idx")
        for code, name in enumerate(getattr(corpus, kind + "_names")):
            in_it = idx == code
            report["per_" + kind][name] = {"documents_in": int(in_it.sum()), "documents_kept": int((in_it & keep).sum())}
    # DeepSeek LLM Table 1: deduplicate over the first k dumps only, for k = 1, 2, ...
    for k, name in enumerate(corpus.dump_names if corpus.dump_names != [""] else [], start=1):
        subset = corpus.dump_idx < k
        if k == len(corpus.dump_names):
            r = removed
        else:
            r, _ = _removed(corpus, buckets, exact_groups, subset)
        n = int(subset.sum())
        report["dedup_rate_by_dumps"].append(
            {"dumps": k, "last_dump": name, "documents": n, "removed": int((r & subset).sum()),
             "rate": float((r & subset).sum() / max(n, 1))})
    return keep, report


@dataclass
class DedupResult:
    keep: np.ndarray  # (D,) bool
    report: dict

    @property
    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.keep)


def dedup_documents(texts: list[str], dumps: list[str] | None = None, sources: list[str] | None = None,
                    config: DedupConfig = DedupConfig()) -> DedupResult:
    """The whole pipeline in one process: documents in input order in, keep mask out. The
    same functions as the datatrove stages, so the kept set is the same."""
    dumps = dumps if dumps is not None else [""] * len(texts)
    sources = sources if sources is not None else [""] * len(texts)
    corpus = shard_signatures(texts, dumps, sources, config)
    scope = corpus.dump_idx if config.mode == "per_dump" else None
    buckets = [bucket_groups(corpus.bands[b], corpus.valid, scope) for b in range(corpus.bands.shape[0])]
    return DedupResult(*merge_duplicates(corpus, buckets, config))


# ----------------------------------------------------------------------------- datatrove stages
def _shard_prefix(work_dir: str, shard: int) -> str:
    return os.path.join(work_dir, "sigs", f"{shard:05d}")


def _check_tasks(step: str, world_size: int, expected: int, what: str) -> None:
    if world_size != expected:
        raise ValueError(f"{step} runs one task per {what}: tasks={world_size}, expected {expected}")


class _DedupStep(PipelineStep):
    type = "🫂 - DEDUP"

    def __init__(self, work_dir: str, config: DedupConfig, n_shards: int):
        super().__init__()
        self.work_dir, self.config, self.n_shards = work_dir, config, n_shards


class MinHashSignatures(_DedupStep):
    """Stage 1, one task per input shard: band keys and exact hashes of the shard's documents."""

    name = "signatures (numpy MinHash)"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _check_tasks("signatures", world_size, self.n_shards, "input shard")
        hasher, parts, batch = MinHasher(self.config), [], []

        def flush():
            texts = [d.text for d in batch]
            parts.append(shard_signatures(texts, [str(d.metadata.get("dump", "")) for d in batch],
                                          [str(d.metadata.get("source", "")) for d in batch], self.config, hasher))
            batch.clear()

        with self.track_time():
            for doc in data or ():
                self.stat_update("documents")
                batch.append(doc)
                if len(batch) == 1024:
                    flush()
            flush()
            os.makedirs(os.path.join(self.work_dir, "sigs"), exist_ok=True)
            concat_shards(parts).save(_shard_prefix(self.work_dir, rank))
        return
        yield


class MinHashBuckets(_DedupStep):
    """Stage 2, one task per band: the buckets of that band over the whole corpus."""

    name = "buckets (one band)"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _check_tasks("buckets", world_size, self.config.bands, "band (dedup.bands)")
        with self.track_time():
            corpus = concat_shards([ShardSignatures.load(_shard_prefix(self.work_dir, s), band=rank)
                                    for s in range(self.n_shards)])
            scope = corpus.dump_idx if self.config.mode == "per_dump" else None
            members, group = bucket_groups(corpus.bands[0], corpus.valid, scope)
            self.stat_update("documents_in_buckets", value=len(members))
            os.makedirs(os.path.join(self.work_dir, "buckets"), exist_ok=True)
            with atomic_open(os.path.join(self.work_dir, "buckets", f"{rank:03d}.npz"), "wb") as fh:
                np.savez(fh, members=members, group=group)
        return
        yield


class MinHashMerge(_DedupStep):
    """Stage 3, one task: components over all bands' buckets and the exact groups; writes each
    shard's removed positions and report.json."""

    name = "merge (union-find, keep first)"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _check_tasks("merge", world_size, 1, "corpus")
        with self.track_time():
            shards = [ShardSignatures.load(_shard_prefix(self.work_dir, s), band=0) for s in range(self.n_shards)]
            buckets = []
            for b in range(self.config.bands if self.config.mode != "exact" else 0):
                with np.load(os.path.join(self.work_dir, "buckets", f"{b:03d}.npz"), allow_pickle=False) as z:
                    buckets.append((z["members"], z["group"]))
            keep, report = merge_duplicates(concat_shards(shards), buckets, self.config)
            os.makedirs(os.path.join(self.work_dir, "removed"), exist_ok=True)
            offset = 0
            for s, shard in enumerate(shards):
                with atomic_open(os.path.join(self.work_dir, "removed", f"{s:05d}.npy"), "wb") as fh:
                    np.save(fh, np.flatnonzero(~keep[offset: offset + len(shard)]))
                offset += len(shard)
            write_atomic(os.path.join(self.work_dir, "report.json"), json.dumps(report, indent=1, sort_keys=True))
            self.stat_update("documents_removed", value=int((~keep).sum()))
        return
        yield


class DedupFilter(_DedupStep):
    """Stage 4, one task per input shard: drops the removed documents, passes the rest on."""

    name = "filter (drop duplicates)"
    type = "🔻 - FILTER"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        _check_tasks("filter", world_size, self.n_shards, "input shard")
        removed = set(np.load(os.path.join(self.work_dir, "removed", f"{rank:05d}.npy")).tolist())
        with np.load(_shard_prefix(self.work_dir, rank) + ".meta.npz", allow_pickle=False) as z:
            nbytes = z["nbytes"]
        i = -1
        for i, doc in enumerate(data or ()):
            if i >= len(nbytes) or len(doc.text.encode("utf-8")) != nbytes[i]:
                raise ValueError(f"dedup filter: shard {rank} document {i} differs from the one the signature stage "
                                 "saw; the reader must give each task the same documents in both stages")
            if i in removed:
                self.stat_update("dropped")
                continue
            self.stat_update("forwarded")
            yield doc
        if i + 1 != len(nbytes):
            raise ValueError(f"dedup filter: shard {rank} has {i + 1} documents, the signature stage saw {len(nbytes)}")


class JsonlShardWriter(PipelineStep):
    """Writes each task's documents to `<output_dir>/<rank>.jsonl` atomically (one JSON object
    per line: id, text, metadata; keys sorted), so a rerun of a task replaces its file whole."""

    type = "💽 - WRITER"
    name = "jsonl (atomic)"

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        os.makedirs(self.output_dir, exist_ok=True)
        with atomic_open(os.path.join(self.output_dir, f"{rank:05d}.jsonl"), "w") as fh:
            for doc in data or ():
                fh.write(json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata},
                                    sort_keys=True, ensure_ascii=False) + "\n")
                self.stat_update("documents")
                yield doc


STAGES = ("signatures", "buckets", "merge", "filter")


def claim_work_dir(work_dir: str, config: DedupConfig, n_shards: int) -> None:
    """Completion markers say a task is done, not with which settings: a work folder serves one
    (config, n_shards) only, so a rerun with other settings cannot reuse stale files."""
    want = json.dumps({"config": vars(config), "n_shards": n_shards}, sort_keys=True)
    path = os.path.join(work_dir, "dedup.json")
    if os.path.exists(path):
        with open(path) as fh:
            have = fh.read()
        if have != want:
            raise ValueError(f"dedup work folder {work_dir} was made with {have}, not {want}: "
                             "use another work folder or delete it")
        return
    os.makedirs(work_dir, exist_ok=True)
    write_atomic(path, want)


def dedup_stages(reader: PipelineStep, n_shards: int, work_dir: str, config: DedupConfig,
                 after_filter: list | None = None) -> list[tuple[str, list, int]]:
    """(stage, datatrove pipeline, tasks) in run order, for any executor. `reader` yields shard
    r's documents as task r of n_shards (a datatrove reader over n_shards files does);
    `after_filter`: steps fed with the kept documents (a writer, filters, a tokenizer). Writes
    nothing: a runner claims the work folder first (`claim_work_dir`)."""
    args = (work_dir, config, n_shards)
    stages = [("signatures", [copy.deepcopy(reader), MinHashSignatures(*args)], n_shards)]
    if config.mode != "exact":
        stages.append(("buckets", [MinHashBuckets(*args)], config.bands))
    stages.append(("merge", [MinHashMerge(*args)], 1))
    stages.append(("filter", [copy.deepcopy(reader), DedupFilter(*args), *(after_filter or [])], n_shards))
    return stages


def build_dedup_executors(reader: PipelineStep, n_shards: int, work_dir: str, config: DedupConfig,
                          workers: int = 1, after_filter: list | None = None, **executor_kwargs) -> dict:
    """stage -> `LocalPipelineExecutor` of `dedup_stages`, in run order. Logs and completion
    markers go to `<work_dir>/logs/<stage>`; `executor_kwargs` go to every executor (start_method)."""
    from datatrove.executor import LocalPipelineExecutor

    claim_work_dir(work_dir, config, n_shards)
    return {stage: LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                         logging_dir=os.path.join(work_dir, "logs", stage), **executor_kwargs)
            for stage, pipeline, tasks in dedup_stages(reader, n_shards, work_dir, config, after_filter)}


def run_dedup(reader: PipelineStep, n_shards: int, work_dir: str, config: DedupConfig, workers: int = 1,
              after_filter: list | None = None, stop_after: str | None = None, **executor_kwargs) -> dict | None:
    """Runs the stages in order (finished tasks of an earlier run are skipped) and returns the
    report; `stop_after` a stage name runs up to and including it and returns None."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r} is not one of {STAGES}")
    for stage, ex in build_dedup_executors(reader, n_shards, work_dir, config, workers, after_filter,
                                           **executor_kwargs).items():
        ex.run()
        if stage == stop_after:
            return None
    with open(os.path.join(work_dir, "report.json")) as fh:
        return json.loads(fh.read())
