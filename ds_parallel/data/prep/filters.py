"""Quality filters (DeepSeek LLM §2.1, "filtering"): datatrove's heuristics, made offline.

The filters, by config name, with their published defaults (override any argument by name):

    gopher_quality     datatrove GopherQualityFilter (Gopher, arXiv:2112.11446 App. A): 50 to
                       100,000 words, mean word length 3 to 10, symbol/word <= 0.1, bullet lines
                       <= 90 %, ellipsis lines <= 30 %, >= 80 % words with a letter, >= 2 stop words
    gopher_repetition  datatrove GopherRepetitionFilter: duplicate lines/paragraphs and
                       top/duplicated n-gram fractions (same appendix, Table A1)
    c4                 datatrove C4QualityFilter (C4, arXiv:1910.10683 §2.2): keeps lines ending
                       in terminal punctuation with >= 3 words, drops pages with < 5 sentences,
                       "lorem ipsum" or a curly bracket. It rewrites the text (the dropped lines go).
                       The bad-words list is a separate datatrove filter that downloads its list
                       at run time; it is not offered.
    fineweb            datatrove FineWebQualityFilter (FineWeb, arXiv:2406.17557 §3.3): line
                       punctuation >= 0.12, short lines <= 0.67, duplicated-line chars <= 0.01,
                       newlines per word <= 0.3
    language           ours: py3langid, whose model ships inside the package (no download, no
                       pickle: numpy arrays in an .npz); keeps `languages` (None: any) with
                       confidence >= `threshold` (0.65, FineWeb's fastText cut, by default)
    length             ours: min/max characters and words (each None = off)

Why a word splitter of our own. datatrove splits words with spaCy (or NLTK), which is not
installed here and splits ~0.15 MB/s per core. Every datatrove filter above is built with
`language=WordSplitter()`, a regex splitter that reads any script offline: runs of letters,
marks and digits (with inner apostrophes: "don't" is one word, where spaCy makes two) are
words; each CJK ideograph or kana is a word (no segmentation model); runs of other non-space
characters are symbol words, which Gopher's ratios discount as spaCy's punctuation tokens.
Sentences end at . ! ? and their CJK forms before a space or the end. The thresholds are the
published ones, applied to these splits; counts may differ from spaCy's by a few words per
page, which moves a page only when it sits at a threshold.

Counting. Each filter is a datatrove BaseFilter, so inside an executor its counts land in
datatrove's stats (`total`, `dropped`, `dropped_<reason>`). `apply_filters` is the plain
API: documents in, kept documents and per-filter counts out, read as the change of those
stats over the call. An `exclusion_dir` gives every filter an ExclusionWriter for the documents
it removes: `<exclusion_dir>/<filter>/<rank:05d>.jsonl`, one JSON object per line with id,
text and metadata (metadata.filter_reason says why). Each file appears whole when its task
ends (temporary + rename); a task killed midway leaves no file and is rerun. (datatrove's
JsonlWriter needs orjson, and writes in place.)
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import regex
from datatrove.data import Document
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.word_tokenizers import WordTokenizer

from ds_parallel.atomic import atomic_open

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_LETTERS = rf"[[\p{{L}}\p{{M}}\p{{N}}]--[{_CJK}]]"  # letters, marks, digits of spaced scripts
_WORD = regex.compile(
    rf"[{_CJK}]"  # one ideograph or kana
    rf"|\p{{N}}+(?:[.,:]\p{{N}}+)+"  # 12.5, 1,000, 10:30
    rf"|{_LETTERS}+(?:['’]{_LETTERS}+)*"  # words, don't
    rf"|[^\s\p{{L}}\p{{M}}\p{{N}}]+",  # symbol runs: "...", "#", "!!"
    regex.V1)
_SENTENCE_END = regex.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|[。！？]+[”’」』）]*")


class WordSplitter(WordTokenizer):
    """datatrove's WordTokenizer interface, offline and for any script (see the module doc)."""

    def __init__(self) -> None:
        super().__init__("any")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if text[start:m.end()].strip():
                spans.append((start, m.end()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in (text[a:b].strip() for a, b in self.span_tokenize(text)) if s]

    # datatrove caches word splits keyed on (text, mode, language): all splitters are one key.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordSplitter)

    def __hash__(self) -> int:
        return hash(WordSplitter)


class ExclusionWriter:
    """What datatrove's BaseFilter needs of an exclusion writer (`with w: w.write(doc, rank)`),
    writing `<folder>/<rank:05d>.jsonl` atomically when the `with` block ends."""

    def __init__(self, folder: str) -> None:
        self.folder = str(folder)
        self._stack: Optional[contextlib.ExitStack] = None
        self._fh = None

    def __enter__(self) -> "ExclusionWriter":
        self._stack = contextlib.ExitStack()
        return self

    def write(self, doc: Document, rank: int = 0) -> None:
        if self._fh is None:  # opened on the first removal: no empty files
            os.makedirs(self.folder, exist_ok=True)
            self._fh = self._stack.enter_context(atomic_open(os.path.join(self.folder, f"{rank:05d}.jsonl")))
        self._fh.write(json.dumps({"id": doc.id, "text": doc.text, "metadata": doc.metadata}, ensure_ascii=False,
                                  default=str) + "\n")

    def __exit__(self, *exc) -> None:
        stack, self._stack, self._fh = self._stack, None, None
        stack.__exit__(*exc)  # atomic_open renames on success, drops the temporary on error


class LanguageIdFilter(BaseFilter):
    """Keeps documents whose py3langid language is in `languages` with probability >=
    `threshold`; records metadata language and language_score on every document."""

    name = "language"

    def __init__(self, languages: Optional[Sequence[str]] = ("en",), threshold: float = 0.65,
                 exclusion_writer: ExclusionWriter | DiskWriter | None = None) -> None:
        super().__init__(exclusion_writer)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"filters.language.threshold={threshold} must be a probability in [0, 1]")
        self.languages = None if languages is None else tuple(languages)
        self.threshold = float(threshold)
        self._identifier = None
        known = set(self.identifier.labels)
        unknown = sorted(set(self.languages or ()) - known)
        if unknown:
            raise ValueError(f"filters.language.languages has codes py3langid does not know: {unknown} "
                             f"(use ISO 639-1 codes such as 'en', 'zh')")

    @property
    def identifier(self):
        if self._identifier is None:  # loaded in each worker: the model is not shipped with the step
            self._identifier = _language_identifier()
        return self._identifier

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_identifier"] = None
        return state

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.identifier.classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(float(score), 4)
        if self.languages is not None and lang not in self.languages:
            return False, "language"
        if score < self.threshold:
            return False, "language_score"
        return True


@functools.cache
def _language_identifier():
    """py3langid's packaged model, read once per process (1 s) and never modified."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LengthFilter(BaseFilter):
    """Keeps documents within [min, max] characters and words (WordSplitter words, so a
    Chinese page counts its characters, not its few spaces)."""

    name = "length"

    def __init__(self, min_chars: Optional[int] = None, max_chars: Optional[int] = None,
                 min_words: Optional[int] = None, max_words: Optional[int] = None,
                 exclusion_writer: ExclusionWriter | DiskWriter | None = None) -> None:
        super().__init__(exclusion_writer)
        for unit, lo, hi in (("chars", min_chars, max_chars), ("words", min_words, max_words)):
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"filters.length.min_{unit}={lo} exceeds max_{unit}={hi}")
        self.min_chars, self.max_chars, self.min_words, self.max_words = min_chars, max_chars, min_words, max_words
        self.words = WordSplitter()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        n = len(doc.text)
        if self.min_chars is not None and n < self.min_chars:
            return False, "too_few_chars"
        if self.max_chars is not None and n > self.max_chars:
            return False, "too_many_chars"
        if self.min_words is not None or self.max_words is not None:
            n = sum(1 for w in self.words.word_tokenize(doc.text) if not _is_symbol(w))
            if self.min_words is not None and n < self.min_words:
                return False, "too_few_words"
            if self.max_words is not None and n > self.max_words:
                return False, "too_many_words"
        return True


def _is_symbol(word: str) -> bool:
    return not regex.search(r"[\p{L}\p{M}\p{N}]", word)


FILTERS = {
    "gopher_quality": GopherQualityFilter,
    "gopher_repetition": GopherRepetitionFilter,
    "c4": C4QualityFilter,
    "fineweb": FineWebQualityFilter,
    "language": LanguageIdFilter,
    "length": LengthFilter,
}
_WORD_SPLITTING = ("gopher_quality", "gopher_repetition", "c4", "fineweb")


def build_filter(name: str, exclusion_dir: Optional[str] = None, **params: Any) -> BaseFilter:
    """The filter `name` of FILTERS with its published defaults, `params` overriding them."""
    if name not in FILTERS:
        raise ValueError(f"filters.{name} is not a filter; choose from {', '.join(FILTERS)}")
    cls = FILTERS[name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "exclusion_writer", "language"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"filters.{name} has no setting {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")
    if exclusion_dir is not None:
        params["exclusion_writer"] = ExclusionWriter(os.path.join(exclusion_dir, name))
    if name in _WORD_SPLITTING:
        params["language"] = WordSplitter()
    step = cls(**params)
    step.filter_key = name  # the config name, for reports (datatrove's `name` is a display string)
    return step


def build_filters(spec: Mapping[str, Optional[Mapping[str, Any]]], exclusion_dir: Optional[str] = None
                  ) -> list[BaseFilter]:
    """`{name: {setting: value} or None}` in order -> filter steps, e.g. a config's
    `filters: {gopher_quality: {}, language: {languages: [en, zh]}}`."""
    return [build_filter(name, exclusion_dir, **dict(params or {})) for name, params in spec.items()]


def _counts(step: BaseFilter) -> dict[str, float]:
    return {k: v.total for k, v in step.stats.stats.items() if k in ("total", "dropped") or k.startswith("dropped_")}


def apply_filters(docs: Iterable[Document | str], filters: Sequence[BaseFilter], rank: int = 0
                  ) -> tuple[list[Document], dict[str, dict]]:
    """Run `filters` in order over `docs` (Documents, or strings given ids "0", "1", ...).

    Returns the kept documents and, per filter, {"documents": seen, "removed": n,
    "reasons": {reason: n}} for this call."""
    docs = [d if isinstance(d, Document) else Document(text=d, id=str(i)) for i, d in enumerate(docs)]
    before = [_counts(f) for f in filters]
    stream: Iterable[Document] = iter(docs)
    for f in filters:
        stream = f.run(stream, rank=rank, world_size=1)
    kept = list(stream)
    report = {}
    for f, old in zip(filters, before):
        new = _counts(f)
        delta = {k: int(v - old.get(k, 0)) for k, v in new.items()}
        reasons = {k[len("dropped_"):]: n for k, n in sorted(delta.items()) if k.startswith("dropped_") and n}
        report[getattr(f, "filter_key", f.name)] = {"documents": delta.get("total", 0),
                                                    "removed": delta.get("dropped", 0), "reasons": reasons}
    return kept, report


def filter_throughput(texts: Sequence[str], filters: Sequence[BaseFilter]) -> float:
    """MB/s (10^6 bytes of UTF-8 input per second) of `filters` over `texts` on this core."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    start = time.perf_counter()
    apply_filters(texts, filters)
    return n_bytes / 1e6 / max(time.perf_counter() - start, 1e-9)
