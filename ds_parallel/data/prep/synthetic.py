"""A seeded corpus with planted near-duplicates and its exact ground truth, for measuring
deduplication (precision and recall per similarity band) and for benchmarks.

Base documents are a few hundred random words (a Zipf-like draw from a random vocabulary of
Latin-letter words, with sentence case and punctuation) or, for `cjk_share` of them, a few
hundred random Han/Kana characters. For each similarity target, `pairs_per_target` bases get
one copy edited to about that word n-gram Jaccard: replacing one word removes up to n of the
copy's n-grams and adds as many new ones, so the number of replaced words is found by bisection
on the exact Jaccard. A copy lands in the base's dump or (for `cross_dump_share`) in another.

The ground truth is not the planted target: `exact_jaccard` computes |A ∩ B| / |A ∪ B| of the
n-gram *sets* of every pair of documents that share an n-gram (an inverted index over n-gram
tuples, no hashing), so accidental overlaps between bases are counted too.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ds_parallel.data.prep.words import split_words

TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
_HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + [chr(c) for c in range(0x3041, 0x3097)]


@dataclass
class SyntheticCorpus:
    texts: list[str]
    dumps: list[str]
    sources: list[str]
    planted: list[tuple[int, int, float]]  # (base index, copy index, target Jaccard)


def ngram_set(text: str, n: int) -> set[tuple[str, ...]]:
    """The n-gram set MinHash estimates Jaccard on (fewer than n words: one n-gram of all)."""
    words = split_words(text)
    n = min(n, len(words))
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)} if n else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def exact_jaccard(texts: list[str], n: int = 5) -> dict[tuple[int, int], float]:
    """{(i, j): J} with i < j for every pair of texts sharing at least one word n-gram."""
    sets = [ngram_set(t, n) for t in texts]
    index: dict[tuple, list[int]] = defaultdict(list)
    for d, s in enumerate(sets):
        for g in s:
            index[g].append(d)
    shared: dict[tuple[int, int], int] = defaultdict(int)
    for docs in index.values():
        for x in range(len(docs)):
            for y in range(x + 1, len(docs)):
                shared[docs[x], docs[y]] += 1
    return {(i, j): c / (len(sets[i]) + len(sets[j]) - c) for (i, j), c in shared.items()}


class _Vocab:
    def __init__(self, rng: random.Random, size: int):
        letters = "abcdefghijklmnopqrstuvwxyz"
        # dict, not set: a set's order follows the salted str hash, and the corpus must not
        self.words = list(dict.fromkeys("".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
                                        for _ in range(size)))
        # Zipf-like, flattened head
        self.cum_weights = list(np.cumsum([1.0 / (r + 10) for r in range(len(self.words))]))

    def draw(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cum_weights, k=k)


def _render(tokens: list[str], cjk: bool, rng: random.Random) -> str:
    """Tokens to text with sentences; punctuation and case never change `split_words`."""
    out, sentence = [], []
    for t in tokens:
        sentence.append(t)
        if len(sentence) >= rng.randint(8, 20):
            out.append(_sentence(sentence, cjk))
            sentence = []
    if sentence:
        out.append(_sentence(sentence, cjk))
    return ("" if cjk else " ").join(out) if rng.random() < 0.7 else "\n".join(out)


def _sentence(words: list[str], cjk: bool) -> str:
    if cjk:
        return "".join(words) + "。"
    return " ".join([words[0].capitalize()] + words[1:]) + "."


def _edit_to(tokens: list[str], target: float, n: int, fresh: list[str], rng: random.Random,
             cjk: bool) -> list[str]:
    """A copy of tokens with the fewest replaced positions whose n-gram Jaccard is <= target."""
    base = ngram_set(" ".join(tokens) if not cjk else "".join(tokens), n)
    positions = list(range(len(tokens)))
    rng.shuffle(positions)

    def edited(m):
        out = list(tokens)
        for k, p in enumerate(positions[:m]):
            out[p] = fresh[k]
        return out

    def sim(m):
        out = edited(m)
        return jaccard(base, ngram_set(" ".join(out) if not cjk else "".join(out), n))

    lo, hi = 0, len(tokens)  # sim(lo) >= target > ... ; find the smallest m with sim(m) <= target
    if sim(0) <= target:
        return edited(0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sim(mid) > target:
            lo = mid
        else:
            hi = mid
    # take whichever of lo, hi lands nearer the target
    return edited(lo if abs(sim(lo) - target) < abs(sim(hi) - target) else hi)


def make_corpus(seed: int = 0, n_singletons: int = 300, pairs_per_target: int = 40, targets=TARGETS,
                n_dumps: int = 4, cjk_share: float = 0.2, cross_dump_share: float = 0.5, n_grams: int = 5,
                words: tuple[int, int] = (200, 400), sources: tuple[str, ...] = ("web", "books")) -> SyntheticCorpus:
    """Documents grouped by dump in dump order (as inputs usually are), shuffled inside a dump."""
    rng = random.Random(seed)
    vocab = _Vocab(rng, 20000)
    dumps = [f"CC-{2020 + d}" for d in range(n_dumps)]

    def base_tokens(cjk):
        k = rng.randint(*words)
        return (rng.choices(_HAN, k=int(k * 1.5)) if cjk else vocab.draw(rng, k)), cjk

    docs = []  # (dump, tokens, cjk, tag)
    plan = [(t, p) for t in targets for p in range(pairs_per_target)]
    for target, _ in plan:
        tokens, cjk = base_tokens(rng.random() < cjk_share)
        fresh = rng.choices(_HAN, k=len(tokens)) if cjk else vocab.draw(rng, len(tokens))
        copy = _edit_to(tokens, target, n_grams, fresh, rng, cjk)
        d_base = rng.randrange(n_dumps)
        d_copy = rng.choice([d for d in range(n_dumps) if d != d_base]) if (
            n_dumps > 1 and rng.random() < cross_dump_share) else d_base
        pair_id = len(docs)
        docs.append((d_base, tokens, cjk, ("base", pair_id, target)))
        docs.append((d_copy, copy, cjk, ("copy", pair_id, target)))
    for _ in range(n_singletons):
        tokens, cjk = base_tokens(rng.random() < cjk_share)
        docs.append((rng.randrange(n_dumps), tokens, cjk, None))
    order = sorted(range(len(docs)), key=lambda i: (docs[i][0], rng.random()))
    where = {i: pos for pos, i in enumerate(order)}
    texts = [_render(docs[i][1], docs[i][2], rng) for i in order]
    planted = [(where[t[1]], where[i], t[2]) for i in order if (t := docs[i][3]) and t[0] == "copy"]
    return SyntheticCorpus(texts=texts, dumps=[dumps[docs[i][0]] for i in order],
                           sources=[rng.choice(sources) for _ in order], planted=planted)


def score_removal(keep: np.ndarray, truth: dict[tuple[int, int], float],
                  edges: tuple[float, ...] = (0.45, 0.6, 0.75, 0.85, 0.925, 0.99, 1.0001),
                  floor: float = 0.45) -> list[dict]:
    """Precision and recall of a keep mask against exact-Jaccard ground truth.

    Under the keep-first rule a document should go iff an *earlier* document is similar to it,
    so each document is scored by `best` = its highest Jaccard with an earlier document.
    Per band [lo, hi) of `best`: recall = removed / documents in the band. Precision at >= lo:
    removed with best >= lo, over those plus the removed documents with best < `floor` (nothing
    earlier is remotely similar, so removing them is wrong: a false merge, or the first of a
    pair dropped instead of the second). Removed documents with best in [floor, lo) count for
    neither: that is LSH's grey zone."""
    best = np.zeros(len(keep))
    for (i, j), sim in truth.items():
        best[j] = max(best[j], sim)
    removed = ~keep
    false_pos = int((removed & (best < floor)).sum())
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = (best >= lo) & (best < hi)
        above = removed & (best >= lo)
        rows.append({"band": f"[{lo:.3g}, {min(hi, 1):.3g}{']' if hi > 1 else ')'}", "lo": lo, "hi": hi, "docs": int(band.sum()),
                     "removed": int((removed & band).sum()),
                     "recall": float((removed & band).sum() / max(band.sum(), 1)),
                     "precision_at_lo": float(above.sum() / max(above.sum() + false_pos, 1)),
                     "false_positives": false_pos})
    return rows


def threshold_scores(keep: np.ndarray, truth: dict[tuple[int, int], float], threshold: float,
                     floor: float = 0.45) -> tuple[float, float]:
    """(recall, precision) at best >= threshold, with `score_removal`'s definitions."""
    row = score_removal(keep, truth, edges=(threshold, 1.0001), floor=floor)[0]
    return row["recall"], row["precision_at_lo"]


def write_jsonl(corpus: SyntheticCorpus, out_dir: str) -> list[dict[str, str]]:
    """The corpus as JSONL files `<out_dir>/<source>/<dump>.jsonl` ({"text"} per line, in corpus
    order); returns the data_prep.inputs entries that read them."""
    import json
    import os

    from ds_parallel.atomic import write_atomic

    files: dict[tuple[str, str], list[str]] = defaultdict(list)
    for text, dump, source in zip(corpus.texts, corpus.dumps, corpus.sources):
        files[(source, dump)].append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    inputs = []
    for (source, dump), lines in sorted(files.items()):
        path = os.path.join(out_dir, source, f"{dump}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, "".join(lines))
        inputs.append({"path": path, "source": source, "dump": dump})
    return inputs


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic corpus with planted near-duplicates as JSONL "
                                                 "(<out>/<source>/<dump>.jsonl), for configs/data/demo_cpu.yaml")
    parser.add_argument("--out", default="runs/data_demo/raw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--singletons", type=int, default=2000)
    args = parser.parse_args()
    corpus = make_corpus(seed=args.seed, n_singletons=args.singletons)
    for entry in write_jsonl(corpus, args.out):
        print(entry)
