"""Character-level tokenizer for the built-in arithmetic corpus.

One id per character, fixed forever: the special tokens take ids 0-2, then the characters
in `CHARS` follow in order, so digit d is id 3 + d. Characters are only ever appended, so
every id a saved dataset or checkpoint uses keeps its meaning: ids 0-18 (digits, "+-*=",
space, newline) are the plain corpus's; "<>/" and the lowercase letters (ids 19-47) spell
the R1 tags "<think>", "</think>", "<answer>", "</answer>" of the chain-of-thought corpus
(data/corpus.py). Forty-eight ids in all, well inside the 128-entry vocabulary of the debug
model presets; the unused rows of the embedding simply never receive a gradient.

BOS and PAD exist for callers that batch variable-length prompts; the packed training
stream only uses EOS, as the separator between problems (Megatron's EOD convention).
"""
from __future__ import annotations

from typing import Iterable

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "0123456789+-*= \n" + "<>/abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    pad_id = 0
    bos_id = 1
    eos_id = 2
    vocab_size = len(SPECIALS) + len(CHARS)  # a class constant: validation needs no instance

    def __init__(self) -> None:
        self._id_of = {c: len(SPECIALS) + i for i, c in enumerate(CHARS)}
        self._char_of = {i: c for c, i in self._id_of.items()}

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt as the model saw problems in training: after the EOS that ends the one
        before (each problem is one document)."""
        return [self.eos_id] + self.encode(prompt)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self._id_of[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the arithmetic vocabulary {CHARS!r}") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Inverse of encode; special tokens are dropped unless `keep_special`."""
        out = []
        for i in ids:
            i = int(i)
            if i in self._char_of:
                out.append(self._char_of[i])
            elif 0 <= i < len(SPECIALS):
                if keep_special:
                    out.append(SPECIALS[i])
            else:
                raise ValueError(f"token id {i} is outside the arithmetic vocabulary (size {self.vocab_size})")
        return "".join(out)
