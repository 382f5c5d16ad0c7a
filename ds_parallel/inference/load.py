"""A model and its tokenizer for generation, from one of our checkpoints or an HF directory.

    source = open_source(ckpt=RUN_OR_STEP_DIR)   # or hf=HF_DIR: reads configs only
    loaded = load_source(source, dtype, ctx)     # each rank builds and reads its own shard

`open_source` builds nothing (no weights, no process group): a launcher checks a request
against the model's shape and the tokenizer before any process starts. `load_source` builds
this rank's part under the parallel context (tp slices, ep experts) and moves it to
`ctx.device`.

Tokenizers. A `tokenizer.json` (the `tokenizers` package) in the HF directory, or in the run
directory / step directory of one of ours, is used as it is: its post-processor adds BOS
where the model expects one. Otherwise one of our runs whose saved config says
`data.source: arithmetic` has the built-in character tokenizer, and a prompt is encoded as
training saw problems: after an EOS (data/loader.py `Datasets.prompt_ids`). Anything else
(indexed data: ids come pre-tokenized) has none, and takes token-id prompts only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from ds_parallel.checkpoint import load_model, read_meta, resolve_checkpoint, saved_model_config
from ds_parallel.config.schema import ModelConfig
from ds_parallel.data.chat import read_chat_template
from ds_parallel.data.tokenizer import CharTokenizer
from ds_parallel.interop.hf import hf_model_config, is_hf_directory, load_hf
from ds_parallel.model import Transformer
from ds_parallel.parallel.groups import ParallelContext


@dataclass(frozen=True)
class Tokenizer:
    """What generation needs of a tokenizer."""
    name: str
    encode: Callable[[str], list[int]]  # a prompt's ids, as the model saw documents begin
    decode: Callable[[Sequence[int]], str]  # completion text, special tokens dropped
    eos_ids: tuple[int, ...]  # stop tokens
    vocab_size: int  # ids the tokenizer can decode: 0 .. vocab_size - 1
    # a user turn's ids in the model's own chat template, ready for the reply (data/chat.py);
    # None: the directory has no chat template
    chat: Optional[Callable[[str], list[int]]] = None


@dataclass(frozen=True)
class Source:
    """A checkpoint as read from its configs: `kind` "ckpt" (path: the step directory) or
    "hf" (path: the HF directory)."""
    kind: str
    path: str
    model_cfg: ModelConfig
    tokenizer: Optional[Tokenizer]

    @property
    def vocab_size(self) -> int:
        """Ids generation may produce: the tokenizer's when it is smaller than the (padded)
        embedding, else the model's."""
        model_vocab = self.model_cfg.vocab_size
        return min(model_vocab, self.tokenizer.vocab_size) if self.tokenizer else model_vocab


@dataclass
class LoadedModel:
    model: Transformer  # eval mode, on ctx.device
    tokenizer: Optional[Tokenizer]
    vocab_size: int  # Source.vocab_size


def char_tokenizer() -> Tokenizer:
    tok = CharTokenizer()
    return Tokenizer("arithmetic (character-level)", tok.prompt_ids, tok.decode,
                     (tok.eos_id,), tok.vocab_size)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def hf_tokenizer(directory: str) -> Optional[Tokenizer]:
    """The `tokenizer.json` in `directory` (None without one). EOS: config.json's
    eos_token_id (an id or a list), else tokenizer_config.json's eos_token."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer as FastTokenizer
    except ImportError:
        raise ValueError(f"{path} needs the tokenizers package: pip install tokenizers") from None
    tok = FastTokenizer.from_file(path)
    eos = _read_json(os.path.join(directory, "config.json")).get("eos_token_id")
    if eos is None:
        token = _read_json(os.path.join(directory, "tokenizer_config.json")).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        eos = tok.token_to_id(token) if token else None
    eos_ids = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    template = read_chat_template(directory)
    chat = None if template is None else (
        lambda text: tok.encode(template.render([("user", text)], add_generation_prompt=True),
                                add_special_tokens=False).ids)
    return Tokenizer(f"tokenizer.json ({directory})", lambda text: tok.encode(text).ids,
                     lambda ids: tok.decode(list(ids), skip_special_tokens=True), eos_ids,
                     tok.get_vocab_size(with_added_tokens=True), chat)


def _run_tokenizer(step_dir: str, run_dir: Optional[str], saved: dict) -> Optional[Tokenizer]:
    for directory in (step_dir, run_dir):
        found = hf_tokenizer(directory) if directory else None
        if found is not None:
            return found
    data = saved.get("data")
    return char_tokenizer() if data and data.get("source", "arithmetic") == "arithmetic" else None


def open_source(ckpt: Optional[str] = None, hf: Optional[str] = None) -> Source:
    """Read the model config and the tokenizer of a run / step directory of ours (`ckpt`,
    verified as load_model will read it) or of an HF DeepSeek directory (`hf`). One-line
    ValueError naming the path when neither can be read."""
    if (ckpt is None) == (hf is None):
        raise ValueError("give exactly one of ckpt (our run or step directory) and hf (an HF directory)")
    if hf is not None:
        if not os.path.isdir(hf):
            raise ValueError(f"{hf} is not a directory")
        return Source("hf", hf, hf_model_config(hf), hf_tokenizer(hf))
    is_step = os.path.isfile(os.path.join(ckpt, "meta.json"))
    try:
        step_dir = resolve_checkpoint(ckpt)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir))) if is_step else ckpt
    saved = read_meta(step_dir)["config"]
    return Source("ckpt", step_dir, saved_model_config(step_dir), _run_tokenizer(step_dir, run_dir, saved))


def policy_tokenizer(init: Optional[str], prompts, needed_by: str) -> Tokenizer:
    """The tokenizer of the weights at `init` (our run / step directory or an HF directory),
    else, for the arithmetic prompts, the built-in character tokenizer; a one-line
    ValueError naming post_train.init otherwise. `prompts` (post_train.prompts): with
    template "chat", prompts are encoded in the tokenizer's chat template."""
    tok = None
    if init:
        tok = open_source(**({"hf": init} if is_hf_directory(init) else {"ckpt": init})).tokenizer
    if tok is None and prompts.source == "arithmetic":
        tok = char_tokenizer()
    if tok is not None and prompts.template == "chat":
        if tok.chat is None:
            raise ValueError(f"post_train.prompts.template=chat, but the tokenizer of post_train.init={init!r} has no "
                             "chat template (tokenizer_config.json chat_template or chat_template.jinja): use "
                             "template=plain")
        return replace(tok, encode=tok.chat, name=f"{tok.name}, chat template")
    if tok is not None:
        return tok
    raise ValueError(f"post_train.init={init!r} has no tokenizer (tokenizer.json); {needed_by} needs one to read "
                     "prompts and completions")


def load_source(source: Source, dtype: torch.dtype = torch.float32,
                ctx: Optional[ParallelContext] = None) -> LoadedModel:
    """This rank's part of the model in `dtype` (eval mode, on ctx.device); collective-free:
    every rank reads its own slices."""
    ctx = ctx or ParallelContext.single()
    load = load_model if source.kind == "ckpt" else load_hf
    model = load(source.path, dtype, ctx).to(ctx.device)
    return LoadedModel(model, source.tokenizer, source.vocab_size)


def load_for_generation(ckpt: Optional[str] = None, hf: Optional[str] = None, dtype: torch.dtype = torch.float32,
                        ctx: Optional[ParallelContext] = None) -> LoadedModel:
    """open_source then load_source."""
    return load_source(open_source(ckpt, hf), dtype, ctx)
