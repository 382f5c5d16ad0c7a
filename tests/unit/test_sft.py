"""SFT data and sample masking (V3 §5.1), fp32 on CPU.

The central check: examples packed several to a row (positions running on, attention masked
per example) give the same summed token losses, MTP losses and parameter gradients as the
same examples alone in right-padded rows (positions from 0, plain causal attention), when
each micro-batch is normalised by the loader's share of the global target count. Removing
the mask breaks it. The chat template is checked on the real DeepSeek-V3 tokenizer against
the whole rendered string and a mask found by hand from its special tokens.
"""
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from ds_parallel.config.load import config_from_dict
from ds_parallel.data.sft import (
    ASSISTANT, BOS, EOS, USER, Example, SFTLoader, SFTRows, collate, example_labels, load_sft_tokenizer, pack,
    pack_rows, pad, read_sft_jsonl, render,
)
from ds_parallel.model import build_model
from ds_parallel.model.transformer import Segments
from ds_parallel.parallel.groups import ParallelContext

CTX = ParallelContext.single()
SEQ_LEN = 64


@pytest.fixture(scope="module")
def tok():
    return load_sft_tokenizer("deepseek_v3")


def random_examples(n: int, seed: int) -> list[Example]:
    """Random ids (vocab 128): a prompt of 1.. unsupervised ids, then a supervised response. Short
    prompts put valid labels within an MTP depth of an example's start, where a depth-k target
    of the example before would cross into it."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(g.integers(8, 30))
        prompt = int(g.integers(1, length - 2))
        out.append(Example(g.integers(0, 128, length), np.arange(length) >= prompt))
    return out


# ---------------------------------------------------------------------------- rows


def test_rows_by_hand():
    a = Example([10, 11, 12, 13], [False, False, True, True])
    b = Example([20, 21, 22], [False, True, True])
    packed = pack([a, b], 8, pad_id=7)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22, 7]]
    # Each example's last position has no target: 13 -> 20 would cross into b.
    assert packed["labels"].tolist() == [[-100, 12, 13, -100, 21, 22, -100, -100]]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, -1]]
    padded = pad([a, b], 5, pad_id=7)
    assert set(padded) == {"input_ids", "labels"}
    assert padded["input_ids"].tolist() == [[10, 11, 12, 13, 7], [20, 21, 22, 7, 7]]
    assert padded["labels"].tolist() == [[-100, 12, 13, -100, -100], [21, 22, -100, -100, -100]]
    with pytest.raises(ValueError, match="row 0 holds 7 > seq_len=6"):
        collate([a, b], [[0, 1]], 6, packed=True)


def test_pack_rows_best_fit_decreasing():
    # Longest first; 3 (example 2) takes row 0's exact room of 3, not row 1's 4; 1 fills row 1.
    assert pack_rows([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    lengths = [len(e.ids) for e in random_examples(200, seed=1)]
    rows = pack_rows(lengths, SEQ_LEN)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert max(sum(lengths[i] for i in row) for row in rows) <= SEQ_LEN
    assert sum(lengths) / (len(rows) * SEQ_LEN) > 0.95  # what best fit buys over one per row
    with pytest.raises(ValueError, match="example 1 has 9 ids"):
        pack_rows([3, 9], 8)


def test_segments_mask_and_mtp_labels_by_hand():
    seg = Segments.of(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert seg.mask.shape == (1, 1, 6, 6) and torch.equal(seg.mask[0, 0], want)
    labels = torch.tensor([[11, -100, 13, 14, -100, -100]])
    # Depth k at i targets labels[i + k], kept only if i and i + k share an example.
    assert seg.mtp_labels(labels, 1).tolist() == [[-100, -100, 14, -100, -100]]
    assert seg.mtp_labels(labels, 2).tolist() == [[-100, -100, -100, -100]]
    assert Segments.of(torch.tensor([[0, 0, 0, 0, 0, 0]])).mtp_labels(labels, 2).tolist() == [[13, 14, -100, -100]]


# ---------------------------------------------------------------------------- packed == padded


def tiny_model(preset: str, mtp_depth: int):
    cfg = config_from_dict({"model": {"preset": preset, "mtp_depth": mtp_depth}}).model
    model = build_model(cfg, CTX, seed=1)
    with torch.no_grad():  # well above the 0.006 init, so attention is far from uniform
        for p in model.parameters():
            p.mul_(3.0)
    return model


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def engine_like(model, micro, use_segments: bool):
    """What train_step does with the SFT objective: each micro-batch's losses over its
    loss_denominator, backward of their mean over micro-batches (DeepSpeed's accumulation)."""
    lm, mtp = 0.0, 0.0
    for b in micro:
        def objective(m, t, b=b):
            return m.finish(t.h, t.aux_loss, b["labels"], t.emb, t.freqs_cis, segments=t.segments,
                            n_targets=b["loss_denominator"].sum())
        out = model(b["input_ids"], segment_ids=b["segment_ids"] if use_segments else None, objective=objective)
        loss = out.lm_loss + (out.mtp_loss if out.mtp_loss is not None else 0.0)
        (loss / len(micro)).backward()
        lm = lm + out.lm_loss.detach() / len(micro)
        if out.mtp_losses is not None:
            mtp = mtp + out.mtp_losses / len(micro)
    return lm, mtp, grads(model)


@pytest.mark.parametrize("preset, mtp_depth", [("debug_v3", 2), ("debug_dense", 0), ("debug_dense_gqa", 0)])
def test_packed_rows_train_like_padded_rows(preset, mtp_depth):
    """MLA + MoE + MTP (2 depths), MHA, GQA. The balance losses are left out: the sequence-wise
    one sees rows, not examples, so it is not a per-example quantity."""
    examples = random_examples(12, seed=0)
    model = tiny_model(preset, mtp_depth)

    # Reference: each example alone in a right-padded row, from position 0, causal attention;
    # every loss is its sum over the batch's targets / N.
    ref = pad(examples, SEQ_LEN)
    n_targets = int((ref["labels"] != -100).sum())
    out = model(ref["input_ids"], objective=lambda m, t: m.finish(
        t.h, t.aux_loss, ref["labels"], t.emb, t.freqs_cis, n_targets=n_targets))
    (out.lm_loss + (out.mtp_loss if mtp_depth else 0.0)).backward()
    ref_lm, ref_mtp, ref_grads = out.lm_loss.detach(), out.mtp_losses, grads(model)
    # N is the plain token mean's own count here (pretraining's finish, one batch).
    torch.testing.assert_close(model(ref["input_ids"], ref["labels"]).lm_loss.detach(), ref_lm, rtol=1e-6, atol=0)
    model.zero_grad(set_to_none=True)

    rows = SFTRows(examples, SEQ_LEN, packed=True)
    assert len(rows) <= 5 and max(len(r) for r in rows.rows) >= 3  # examples really share rows
    loader = SFTLoader(rows, global_batch_size=len(rows), micro_batch_size=1, dp_rank=0, dp=1, seed=0)
    micro = loader.micro_batches(0)
    assert loader.n_targets(0) == n_targets

    lm, mtp, packed_grads = engine_like(model, micro, use_segments=True)
    torch.testing.assert_close(lm, ref_lm, rtol=1e-5, atol=0)
    if mtp_depth:
        torch.testing.assert_close(mtp, ref_mtp, rtol=1e-5, atol=0)
    assert packed_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(packed_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)

    # Without the mask the examples of a row read each other: losses and gradients move.
    lm, _, leaky_grads = engine_like(model, micro, use_segments=False)
    assert abs(lm - ref_lm) > 1e-3
    assert max((leaky_grads[n] - ref_grads[n]).abs().max() for n in ref_grads) > 1e-2


# ---------------------------------------------------------------------------- loader


def test_loader_covers_the_global_batch_with_its_target_count():
    rows = SFTRows(random_examples(40, seed=2), SEQ_LEN, packed=True)
    assert rows.n_targets.tolist() == [int((rows.batch([r])["labels"] != -100).sum()) for r in range(len(rows))]
    gbs, mbs, dp = 4, 1, 2
    loaders = [SFTLoader(rows, gbs, mbs, rank, dp, seed=5) for rank in range(dp)]
    for step in (0, 3):
        per_rank = [ld.micro_batches(step) for ld in loaders]
        # Position (m * dp + r) * mbs of the global batch is rank r's micro-batch m.
        got = torch.cat([per_rank[r][m]["input_ids"] for m in range(gbs // (mbs * dp)) for r in range(dp)])
        whole = rows.batch(loaders[0].order.sample_ids(step))
        assert torch.equal(got, whole["input_ids"])
        denominators = torch.cat([mb["loss_denominator"] for mbs_ in per_rank for mb in mbs_])
        torch.testing.assert_close(denominators.sum(), (whole["labels"] != -100).sum().float())
        assert all(set(mb) == {"input_ids", "labels", "segment_ids", "loss_denominator"} for mb in per_rank[0])
    again = SFTLoader(rows, gbs, mbs, 1, dp, seed=5).micro_batches(3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, loaders[1].micro_batches(3)))
    assert not torch.equal(loaders[1].micro_batches(0)[0]["input_ids"], again[0]["input_ids"])


# ---------------------------------------------------------------------------- template


CHAT = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6, since 3 + 3 = 6."},
]}


def test_render_two_turns_on_the_deepseek_v3_tokenizer(tok):
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id) == (0, 1, 128803, 128804)
    ids, supervised = render(CHAT, tok)
    text = (BOS + "You are terse." + USER + "What is 2+2?" + ASSISTANT + "4." + EOS + USER + "And 3 + 3?"
            + ASSISTANT + "6, since 3 + 3 = 6." + EOS)
    whole = tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == whole  # piece by piece == the whole string
    # By hand: supervised from after each <｜Assistant｜> through the next <｜end▁of▁sentence｜>.
    want, inside = [], False
    for i in whole:
        want.append(inside and i != tok.assistant_id)
        inside = (inside or i == tok.assistant_id) and i != tok.eos_id
    assert supervised == want and sum(want) == len(tok.encode("4.")) + len(tok.encode("6, since 3 + 3 = 6.")) + 2
    assert tok.decode([i for i, s in zip(ids, supervised) if s]) == "4." + EOS + "6, since 3 + 3 = 6." + EOS
    labels = example_labels(Example(ids, supervised))
    assert [tok.decode([t]) for t in labels[labels != -100]] == [tok.decode([i]) for i, s in zip(ids, supervised) if s]


def test_prompt_response_is_one_user_and_one_assistant_turn(tok):
    one = render({"prompt": "Hi", "response": "Hello!", "id": 7}, tok)
    two = render({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}, tok)
    assert one == two and one.ids[:2] == [tok.bos_id, tok.user_id] and one.ids[-1] == tok.eos_id


@pytest.mark.parametrize("line, match", [
    ("not json", r"line 2: not valid JSON"),
    ("[1, 2]", r"line 2: an example must be a JSON object"),
    ('{"prompt": "x"}', r"line 2: 'response' must be a string"),
    ('{"prompt": "x", "response": "y", "messages": []}', r"line 2: give either 'messages'"),
    ('{"messages": []}', r"line 2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"line 2: messages\[0\]\.role='bot' must be one of"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"line 2: messages\[0\] must be an object with a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     r"line 2: messages\[1\]\.role='user' must be 'assistant'"),
    ('{"messages": [{"role": "user", "content": "a"}]}', r"line 2: messages\[0\] must be an assistant turn"),
])
def test_malformed_line_names_line_and_field(tmp_path, tok, line, match):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match) as err:
        read_sft_jsonl(str(path), tok, SEQ_LEN)
    assert "\n" not in str(err.value)


def test_read_drops_and_counts_examples_longer_than_a_row(tmp_path, tok):
    path = tmp_path / "sft.jsonl"
    lines = [CHAT, {"prompt": "Hi", "response": "Hello!"}, {"prompt": "Count", "response": " ".join(["one"] * 80)}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    examples, n_dropped = read_sft_jsonl(str(path), tok, 40)
    assert n_dropped == 1 and [list(e.ids) for e in examples] == [render(CHAT, tok).ids, render(lines[1], tok).ids]
    with pytest.raises(ValueError, match=r"all 3 are longer than train.seq_len=4"):
        read_sft_jsonl(str(path), tok, 4)


def test_load_sft_tokenizer_paths_and_errors(tmp_path, tok):
    with pytest.raises(ValueError, match=r"post_train.sft.tokenizer='/no/such' is neither"):
        load_sft_tokenizer("/no/such")
    (tmp_path / "hf").mkdir()
    tok.tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert load_sft_tokenizer(str(tmp_path / "hf")).assistant_id == tok.assistant_id
    (tmp_path / "plain").mkdir()
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "plain" / "tokenizer.json"))
    with pytest.raises(ValueError, match="has no single token for '<｜begin▁of▁sentence｜>'"):
        load_sft_tokenizer(str(tmp_path / "plain" / "tokenizer.json"))


def test_plain_rendering_with_the_arithmetic_character_tokenizer():
    """tokenizer: arithmetic has no chat template: each user turn after an EOS (as pre-training
    and generation feed problems), each assistant turn supervised and closed by an EOS."""
    from ds_parallel.data.sft import PlainSFTTokenizer
    from ds_parallel.data.tokenizer import CharTokenizer

    chars, plain = CharTokenizer(), load_sft_tokenizer("arithmetic")
    assert isinstance(plain, PlainSFTTokenizer) and plain.vocab_size == CharTokenizer.vocab_size
    eos = CharTokenizer.eos_id
    ids, supervised = render({"messages": [{"role": "user", "content": "21+93="},
                                           {"role": "assistant", "content": "<answer>051</answer>"},
                                           {"role": "user", "content": "1+1="},
                                           {"role": "assistant", "content": "20"}]}, plain)
    want = ([eos] + chars.encode("21+93=") + chars.encode("<answer>051</answer>") + [eos]
            + [eos] + chars.encode("1+1=") + chars.encode("20") + [eos])
    mask = [False] * 7 + [True] * 21 + [False] * 5 + [True] * 3
    assert list(ids) == want and list(supervised) == mask
    with pytest.raises(ValueError, match="system message needs a chat template"):
        render({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "1+1="},
                             {"role": "assistant", "content": "2"}]}, plain)


def test_builtin_chats_never_hold_a_heldout_problem():
    """The cold-start chats (builtin:arithmetic) come from the training side of the corpus:
    none is a problem that pre-training's or GRPO's held-out evaluation scores."""
    from ds_parallel.config.load import config_from_dict
    from ds_parallel.rl.prompts import build_prompts
    from ds_parallel.rl.sft import builtin_examples

    cfg = config_from_dict({"data": {"n_eval": 64}, "post_train": {"prompts": {"n_eval": 300}}})
    chats = builtin_examples(cfg)
    _, heldout = build_prompts(cfg.post_train.prompts, cfg.train.seed, cfg.data)
    assert len(chats) == 2000 and len(heldout) == 300
    assert not {c["prompt"] for c in chats} & {p.text for p in heldout}
    assert all(c["response"].startswith("<think>") and c["response"].endswith("</answer>") for c in chats)
    # Without the exclusion, 2000 draws from the 10^4 sums would hit ~18% of the held-out ones (1 - e^-0.2).


# ---------------------------------------------------------------------------- a student's own chat template

@pytest.fixture(scope="module")
def llama_student(tmp_path_factory):
    """A random LlamaForCausalLM with its own byte-level BPE and Llama 3 chat template, written by
    transformers (benchmarks/distill_cpu.py)."""
    from benchmarks.distill_cpu import write_llama_student

    path = tmp_path_factory.mktemp("student")
    texts = ["21+93=", "<think>2+9+0=11 1+3+1=50</think><answer>150</answer>", "What is 2+2? Four, since 2+2=4."]
    write_llama_student(str(path), texts * 20, bpe_size=300)
    return path


def test_student_template_renders_as_transformers_and_masks_the_assistant(llama_student, tmp_path):
    """The student's chat template rendered without transformers gives transformers' ids
    (apply_chat_template) on a multi-turn chat with a system message; the supervised ids are
    exactly each assistant turn and its end of turn; prompts for generation (template chat)
    equal transformers' add_generation_prompt=True ids."""
    from transformers import AutoTokenizer

    from ds_parallel.config.schema import PromptConfig
    from ds_parallel.data.sft import TemplateSFTTokenizer
    from ds_parallel.inference.load import policy_tokenizer

    theirs = AutoTokenizer.from_pretrained(str(llama_student))
    ours = load_sft_tokenizer(str(llama_student))
    assert isinstance(ours, TemplateSFTTokenizer) and ours.eos_id == theirs.convert_tokens_to_ids("<|eot_id|>")
    chat = {"messages": [
        {"role": "system", "content": "Add."}, {"role": "user", "content": "21+93="},
        {"role": "assistant", "content": "<think>2+9+0=11 1+3+1=50</think><answer>150</answer>"},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four, since 2+2=4."}]}
    ids, supervised = render(chat, ours)

    def hf_ids(messages, **kw):
        out = theirs.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    assert list(ids) == hf_ids(chat["messages"])
    learned = [ours.decode([i for i, s in zip(ids, supervised) if s])]
    assert learned == ["<think>2+9+0=11 1+3+1=50</think><answer>150</answer><|eot_id|>Four, since 2+2=4.<|eot_id|>"]
    # The prompt side: what generation feeds the student before its reply.
    tok = policy_tokenizer(str(llama_student), PromptConfig(source="arithmetic", template="chat"), "test")
    assert tok.encode("21+93=") == hf_ids([{"role": "user", "content": "21+93="}], add_generation_prompt=True)
    assert tok.eos_ids == (ours.eos_id,)
    with pytest.raises(ValueError, match="post_train.prompts.template=chat, but the tokenizer of"):
        policy_tokenizer(None, PromptConfig(source="arithmetic", template="chat"), "test")


def test_saved_deepseek_template_renders_as_the_code_template(tmp_path, tok):
    """An SFT run saves its tokenizer with DeepSeek-V3's template as Jinja (rl/sft.py
    save_tokenizer); loading the run directory renders every chat as the code template does,
    ids and mask, and generation then stops on its EOS."""
    from ds_parallel.data.sft import TemplateSFTTokenizer
    from ds_parallel.inference.load import hf_tokenizer
    from ds_parallel.rl.sft import save_tokenizer

    save_tokenizer("deepseek_v3", str(tmp_path))
    saved = load_sft_tokenizer(str(tmp_path))
    assert isinstance(saved, TemplateSFTTokenizer) and saved.eos_id == tok.eos_id
    for example in (CHAT, {"prompt": "Hi", "response": "Hello!"}):
        assert render(example, saved) == render(example, tok)
    loaded = hf_tokenizer(str(tmp_path))
    assert loaded.eos_ids == (tok.eos_id,)
    assert loaded.chat("Hi") == [tok.bos_id, tok.user_id] + tok.encode("Hi") + [tok.assistant_id]


def test_reference_answer_responses(tmp_path, tok):
    """post_train.sft.responses=answer trains on the reference answer alone, in R1's tags."""
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "21+93=", "response": "<think>x</think><answer>150</answer>",
                                "answer": "150"}) + "\n")
    (example,), _ = read_sft_jsonl(str(path), tok, SEQ_LEN, responses="answer")
    assert tok.decode([i for i, s in zip(example.ids, example.supervised) if s]) == "<answer>150</answer>" + EOS
    path.write_text(json.dumps({"prompt": "21+93=", "response": "150"}) + "\n")
    with pytest.raises(ValueError, match="line 1: post_train.sft.responses=answer needs 'prompt' and a string 'answer'"):
        read_sft_jsonl(str(path), tok, SEQ_LEN, responses="answer")
