"""Chat templates: an HF tokenizer_config.json's Jinja `chat_template`, rendered without transformers.

A student model of another family (Llama, Qwen2) is distilled in its own chat format, not the
teacher's (DeepSeek-R1 §2.4: the students are fine-tuned on R1's samples). Its directory holds
tokenizer.json and tokenizer_config.json, whose `chat_template` is a Jinja program over
`messages` ([{"role", "content"}]), `add_generation_prompt`, `bos_token` and `eos_token`. It is
rendered here as transformers' `apply_chat_template` renders it: a sandboxed environment
(templates are data, not code) with trim_blocks and lstrip_blocks and a `raise_exception`
helper; tests/unit/test_sft.py checks the ids against transformers'.

The assistant's part of a rendered conversation, which SFT supervises, is found by prefix
difference, so a template needs no `{% generation %}` markers (few ship them):

    render(messages[:i], add_generation_prompt=True)   the prompt up to assistant turn i
    render(messages[:i+1])                             the same with turn i written

The text the second adds to the first is the assistant's content and the template's end of
turn (e.g. Llama 3's <|eot_id|>): what the model must write, and stop on. A template whose
renders are not prefixes of each other (one that rewrites earlier turns, as some reasoning
templates drop old thoughts) is refused with a one-line error.

DEEPSEEK_V3_TEMPLATE writes the format data/sft.py renders in code for the DeepSeek-V3
tokenizer; an SFT run saves it beside its tokenizer.json so that later phases and the
generation launchers can prompt the fine-tuned model in the format it learned.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

# BOS, then turns back to back; each assistant turn ends with EOS (data/sft.py's render).
DEEPSEEK_V3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def _token(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja program
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source).render(
            messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)

    def pieces(self, messages: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_assistant) pieces, in order (module docstring)."""
        out, done = [], ""
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            prompt, written = self.render(messages[:i], True), self.render(messages[: i + 1])
            if not prompt.startswith(done) or not written.startswith(prompt):
                raise ValueError(f"the chat template does not render turn {i} as an extension of the turns before it; "
                                 "SFT needs one whose renders grow by appending (see data/chat.py)")
            out += [(prompt[len(done):], False), (written[len(prompt):], True)]
            done = written
        return [(text, supervised) for text, supervised in out if text]


def read_chat_template(directory: str) -> Optional[ChatTemplate]:
    """The chat template of an HF tokenizer directory (None without one): chat_template.jinja
    (as transformers 5 saves it) or tokenizer_config.json's chat_template, with the special
    tokens of tokenizer_config.json."""
    path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path) as fh:
            config = json.load(fh)
    source = config.get("chat_template")
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as fh:
            source = fh.read()
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        return None
    return ChatTemplate(source, _token(config.get("bos_token")) or "", _token(config.get("eos_token")) or "")
