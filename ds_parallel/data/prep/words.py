"""Word splitting and text normalisation for deduplication: offline, dependency-free, fast.

MinHash compares documents by their sets of word n-grams, so the word splitter decides what
"the same text" means and, at web scale, most of the cost of the signature step. datatrove's
`MinhashDedupSignature` splits words with spaCy (~0.15 MB/s per core); a regex over the
lowercased text does the same job for deduplication at tens of MB/s:

- Latin, Cyrillic, Greek, ... : maximal runs of word characters (`\\w`, Unicode-aware),
  lowercased, so punctuation and whitespace never matter;
- CJK, which has no spaces between words: one token per Han, Kana or Hangul character
  (character n-grams are the usual unit for Chinese and Japanese near-duplicate detection).

`normalize_text` is the key of *exact* deduplication: NFKC (full-width letters and digits,
ligatures and compatibility forms fold to their plain forms), lowercase, punctuation and
symbols removed, whitespace runs collapsed to one space. Two documents that differ only in
case, spacing, line breaks or punctuation get the same key.
"""
from __future__ import annotations

import re
import unicodedata

# Han (CJK unified ideographs, extension A, compatibility ideographs, extensions B-F), CJK
# punctuation-free symbols excluded; Hiragana, Katakana (+ phonetic extensions, half-width);
# Hangul syllables and jamo.
CJK_RANGES = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
    "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
    "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
)
# One CJK character, or a run of word characters that are not CJK. `[^\W...]` is "a word
# character other than these", the usual way to subtract from `\w` in Python's `re`.
_WORD_RE = re.compile(f"[{CJK_RANGES}]|[^\\W{CJK_RANGES}]+")
_NOT_WORD_OR_SPACE_RE = re.compile(r"[^\w\s]+")


def split_words(text: str) -> list[str]:
    """Lowercased words of `text`: Latin-script runs of word characters, single CJK characters.

    >>> split_words("Hello, World! 你好世界 it's")
    ['hello', 'world', '你', '好', '世', '界', 'it', 's']
    """
    return _WORD_RE.findall(text.lower())


def normalize_text(text: str) -> str:
    """The text exact deduplication compares: NFKC, lowercase, no punctuation or symbols,
    single spaces.

    >>> normalize_text("  Ｈｅｌｌｏ,\\n\\tWORLD!! ")
    'hello world'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_NOT_WORD_OR_SPACE_RE.sub(" ", text).split())
