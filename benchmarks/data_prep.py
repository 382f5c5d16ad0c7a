"""Data preparation throughput, MB/s per core: our MinHash signature step and Gopher filters
(`ds_parallel.data.prep.dedup.MinHashSignatures`: regex word splitter, numpy MinHash, band keys,
exact hashes, atomic writes) against datatrove's own `MinhashDedupSignature` (its word
tokenizer, per-n-gram hashing, signature and sorted bucket files), both FineWeb's 5-grams and
14 x 8 hashes, one process each on the same generated corpus (`data/prep/synthetic.py`),
timed round-robin (benchmarks/common.py), MB/s = UTF-8 bytes / CPU seconds of the step.

datatrove's defaults need spaCy (English word splitting) and xxhash; where either is missing
it runs with `str.split` words and/or SHA-1 hashes instead, and the table says so. `str.split`
is far cheaper than spaCy, so that ratio understates our lead over datatrove as configured by
FineWeb.

Before timing, both steps' signatures are checked for sense: near-duplicate pairs (exact
Jaccard >= 0.9) must share a band key in both, and ours must recall them at >= 0.95.

    .venv/bin/python benchmarks/data_prep.py [--repeats 3 --warmup 1 --pairs 40 --singletons 300]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import struct
import tempfile
from collections import deque

import numpy as np
from common import table, time_interleaved  # first: puts the repo on sys.path
from datatrove.data import Document
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from ds_parallel.data.prep.dedup import DedupConfig, MinHashSignatures, ShardSignatures
from ds_parallel.data.prep.synthetic import exact_jaccard, make_corpus


class SplitWords(WordTokenizer):
    """datatrove's word-tokenizer interface over `str.split`, for when spaCy is missing."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def datatrove_signature_step(out: str) -> tuple[MinhashDedupSignature, str]:
    has_spacy, has_xxhash = (importlib.util.find_spec(m) is not None for m in ("spacy", "xxhash"))
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8,
                           hash_config=HashConfig(hash_fc="xxhash" if has_xxhash else "sha1"))
    step = MinhashDedupSignature(out, config=config, language="en" if has_spacy else SplitWords())
    label = f"datatrove ({'spaCy' if has_spacy else 'str.split'} words, {'xxhash' if has_xxhash else 'sha1'})"
    return step, label


def drain(out) -> None:
    """A step's `run` is a generator (ours) or returns None (datatrove's signature step)."""
    if out is not None:
        deque(out, maxlen=0)


def datatrove_shared_bucket(out: str, pairs: list[tuple[int, int]]) -> float:
    """Share of `pairs` whose documents have an equal signature in some bucket file."""
    rows = {}
    for b in range(14):
        with open(os.path.join(out, f"bucket_{b:03d}", "00000.minhash.sig"), "rb") as fh:
            data = fh.read()
        for off in range(0, len(data), 8 * 8 + 4):
            *sig, doc = struct.unpack("<8QI", data[off: off + 68])
            rows.setdefault(doc, set()).add((b, tuple(sig)))
    return float(np.mean([bool(rows.get(i, set()) & rows.get(j, set())) for i, j in pairs]))


def bench_signatures(docs: list[Document], pairs: list[tuple[int, int]], args) -> list[list[str]]:
    mb = sum(len(d.text.encode("utf-8")) for d in docs) / 1e6
    tmp = tempfile.mkdtemp(prefix="data_prep_bench_")
    try:
        ours = MinHashSignatures(os.path.join(tmp, "ours"), DedupConfig(), n_shards=1)
        theirs, label = datatrove_signature_step(os.path.join(tmp, "theirs"))
        fns = {"ours": lambda: drain(ours.run(iter(docs))), label: lambda: drain(theirs.run(iter(docs)))}
        fns["ours"](), fns[label]()
        bands = ShardSignatures.load(os.path.join(tmp, "ours", "sigs", "00000")).bands
        ours_recall = float(np.mean([(bands[:, i] == bands[:, j]).any() for i, j in pairs]))
        # CJK text has no spaces: `str.split` gives datatrove whole sentences as words there
        latin = [(i, j) for i, j in pairs if docs[i].text.isascii()]
        theirs_recall = datatrove_shared_bucket(os.path.join(tmp, "theirs"), latin)
        print(f"pairs with exact Jaccard >= 0.9 sharing a band key: ours {ours_recall:.3f} of {len(pairs)}, "
              f"datatrove {theirs_recall:.3f} of the {len(latin)} Latin-script ones")
        if ours_recall < 0.95 or theirs_recall < 0.95:
            raise SystemExit("signature check failed: near-duplicates do not collide")
        timing = time_interleaved(fns, args.warmup, args.repeats, label="signatures ")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = mb / (timing[label].cpu_ms / 1e3)
    rows = []
    for name, t in timing.items():
        rate = mb / (t.cpu_ms / 1e3)
        rows.append([f"signatures: {name}", f"{mb:.2f}", f"{t.wall_ms / 1e3:.2f}", f"{t.cpu_ms / 1e3:.2f}",
                     f"{rate:.2f}", f"{rate / base:.1f}x"])
    return rows


def bench_filters(args) -> list[list[str]]:
    """Gopher quality + repetition filters on the same documents: ours (data/prep/filters.py,
    datatrove's filter code given our offline regex word splitter) against datatrove's as
    FineWeb runs them (spaCy words), or with `str.split` words where spaCy is missing."""
    import copy

    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    from ds_parallel.data.prep.filters import build_filters

    has_spacy = importlib.util.find_spec("spacy") is not None
    # English prose, which the Gopher rules were written for (random words fail the stop-word
    # rule at once): the Python documentation's topics, shipped with Python.
    from pydoc_data.topics import topics

    docs = [Document(text=text, id=name) for name, text in sorted(topics.items())]
    label = f"datatrove ({'spaCy' if has_spacy else 'str.split'} words)"
    words = "en" if has_spacy else SplitWords()
    mb = sum(len(d.text.encode("utf-8")) for d in docs) / 1e6

    def run(steps):
        data = iter(copy.deepcopy(docs))  # filters may annotate documents
        for step in steps:
            data = step.run(data)
        return sum(1 for _ in data)

    ours = build_filters({"gopher_quality": {}, "gopher_repetition": {}})
    theirs = [GopherQualityFilter(language=words), GopherRepetitionFilter(language=words)]
    print(f"documents kept by the Gopher filters: ours {run(ours)}, {label} {run(theirs)} of {len(docs)}")
    timing = time_interleaved({"ours": lambda: run(ours), label: lambda: run(theirs)}, args.warmup, args.repeats,
                              label="filters ")
    base = mb / (timing[label].cpu_ms / 1e3)
    return [[f"gopher filters: {name}", f"{mb:.2f}", f"{t.wall_ms / 1e3:.2f}", f"{t.cpu_ms / 1e3:.2f}",
             f"{mb / (t.cpu_ms / 1e3):.2f}", f"{mb / (t.cpu_ms / 1e3) / base:.1f}x"] for name, t in timing.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=40, help="planted near-duplicate pairs per similarity target")
    parser.add_argument("--singletons", type=int, default=300)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    corpus = make_corpus(seed=0, n_singletons=args.singletons, pairs_per_target=args.pairs)
    docs = [Document(text=t, id=str(i), metadata={"dump": d, "source": s})
            for i, (t, d, s) in enumerate(zip(corpus.texts, corpus.dumps, corpus.sources))]
    pairs = [p for p, v in exact_jaccard(corpus.texts).items() if v >= 0.9]
    rows = bench_signatures(docs, pairs, args) + bench_filters(args)
    print(table(["step", "MB", "wall s", "cpu s", "MB/s per core", "vs datatrove"], rows))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
