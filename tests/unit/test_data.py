"""Data layer: tokenizer, arithmetic corpus, Megatron indexed files, packing and batching."""
import itertools
import os
from collections import Counter

import numpy as np
import pytest
import torch

from ds_parallel.config.schema import DataConfig, TrainConfig
from ds_parallel.data.corpus import answer_width, build_corpus, chance_accuracy, format_cot, format_problem, read_number
from ds_parallel.data.indexed import IndexedDataset, IndexedDatasetWriter
from ds_parallel.data.loader import GlobalBatchLoader, PackedSamples, build_datasets, join_documents
from ds_parallel.data.tokenizer import CharTokenizer


def test_tokenizer_round_trip_and_fixed_ids():
    tok = CharTokenizer()
    text = "0123456789+-*= \n21+93=150"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, keep_special=True) == "<bos>" + text + "<eos>"
    assert tok.encode("0129") == [3, 4, 5, 12]  # ids are part of every saved dataset: never move them
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 48 <= 128 and max(ids) < tok.vocab_size
    with pytest.raises(ValueError, match="'X'"):
        tok.encode("1X2")


def test_tokenizer_spells_the_r1_tags_after_the_old_ids():
    tok = CharTokenizer()
    # The plain corpus's 19 ids are where they were; the tag characters come after them.
    assert tok.encode("0123456789+-*= \n") == list(range(3, 19))
    ids = tok.encode("<think></think><answer>x</answer>")
    assert min(ids) >= 19 and tok.decode(ids) == "<think></think><answer>x</answer>"
    assert tok.encode("<>/az") == [19, 20, 21, 22, 47]


def _parse(text, n_digits):
    """(a, op, b, value) from "21+93=150", read independently of format_problem."""
    a, op, b, eq = text[:n_digits], text[n_digits], text[n_digits + 1 : 2 * n_digits + 1], text[2 * n_digits + 1]
    assert eq == "="
    return read_number(a), op, read_number(b), read_number(text[2 * n_digits + 2 :])


def test_problem_format_examples():
    assert format_problem(12, "+", 39, 2) == ("21+93=", "150")
    assert format_problem(70, "-", 8, 2) == ("07-80=", "26")
    assert format_problem(12, "*", 39, 2) == ("21*93=", "8640")
    assert read_number("150") == 51
    with pytest.raises(ValueError, match="a >= b"):
        format_problem(3, "-", 5, 1)


@pytest.mark.parametrize("n_digits,ops,n_eval", [(1, "+-*", 40), (2, "+", 256), (3, "+-*", 100)])
def test_corpus_answers_are_correct_arithmetic(n_digits, ops, n_eval):
    corpus = build_corpus(n_digits, ops, n_train=3000, n_eval=n_eval, seed=7)
    seen_ops = Counter()
    for text in corpus.train + [p + a for p, a in corpus.heldout]:
        a, op, b, value = _parse(text, n_digits)
        assert value == {"+": a + b, "-": a - b, "*": a * b}[op], text
        assert len(text) == 2 * n_digits + 2 + answer_width(op, n_digits)
        assert 0 <= b <= (a if op == "-" else 10**n_digits - 1) and a < 10**n_digits
        seen_ops[op] += 1
    assert set(seen_ops) == set(ops)
    assert min(seen_ops.values()) > 0.25 * sum(seen_ops.values()) / len(ops)  # ops drawn evenly


def test_corpus_is_deterministic_and_splits_are_disjoint():
    one = build_corpus(2, "+-", n_train=5000, n_eval=300, seed=1)
    assert one == build_corpus(2, "+-", n_train=5000, n_eval=300, seed=1)
    assert one.train != build_corpus(2, "+-", n_train=5000, n_eval=300, seed=2).train
    heldout = [p + a for p, a in one.heldout]
    assert len(one.train) == 5000 and len(heldout) == len(set(heldout)) == 300
    assert not set(heldout) & set(one.train)
    # With n_digits=1 the 100 addition problems are split between the two sides exactly.
    small = build_corpus(1, "+", n_train=2000, n_eval=30, seed=0)
    assert len(set(small.train)) == 70 and not set(small.train) & {p + a for p, a in small.heldout}
    with pytest.raises(ValueError, match="data.n_eval=100"):
        build_corpus(1, "+", n_train=10, n_eval=100, seed=0)
    with pytest.raises(ValueError, match="data.ops"):
        build_corpus(2, "+/", n_train=10, n_eval=10, seed=0)


@pytest.mark.parametrize("n_digits", [1, 2])
def test_chance_accuracy_matches_brute_force(n_digits):
    n = 10**n_digits
    best = {}
    for op in "+-*":
        answers = Counter()
        for a, b in itertools.product(range(n), repeat=2):  # the corpus's draw, swap included
            a, b = (b, a) if op == "-" and a < b else (a, b)
            answers[format_problem(a, op, b, n_digits)[1]] += 1
        best[op] = max(answers.values()) / n**2
        assert chance_accuracy(n_digits, op) == pytest.approx(best[op], rel=1e-12)
    assert chance_accuracy(n_digits, "+-*") == pytest.approx(sum(best.values()) / 3)
    assert chance_accuracy(n_digits, "++-") == pytest.approx((best["+"] + best["-"]) / 2)


def test_packing_windows_shift_by_one():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    stream = join_documents(docs, eos_id=2)
    assert stream.tolist() == [5, 6, 7, 2, 8, 2, 9, 10, 11, 12, 2]
    samples = PackedSamples(stream, seq_len=4)
    assert len(samples) == 2  # (11 - 1) // 4
    assert samples[0].tolist() == [5, 6, 7, 2, 8] and samples[1].tolist() == [8, 2, 9, 10, 11]
    assert samples[np.array([1, 0])].shape == (2, 5)
    with pytest.raises(IndexError):
        samples[2]
    loader = GlobalBatchLoader(samples, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp=1, seed=0)
    (inputs, labels), = loader.micro_batches(0)
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == labels.shape == (2, 4)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert sorted(map(tuple, torch.cat([inputs, labels[:, -1:]], 1).tolist())) == sorted(
        map(tuple, samples[np.arange(2)].tolist()))


def _union_over_ranks(samples, gbs, mbs, dp, step, seed):
    """The global batch reassembled from every rank's micro-batches, in position order."""
    rows = {}
    for rank in range(dp):
        loader = GlobalBatchLoader(samples, gbs, mbs, rank, dp, seed)
        assert loader.n_micro == gbs // (mbs * dp)
        for m, (inputs, labels) in enumerate(loader.micro_batches(step)):
            assert inputs.shape == (mbs, samples.seq_len)
            full = torch.cat([inputs, labels[:, -1:]], 1)
            for j in range(mbs):
                rows[(m * dp + rank) * mbs + j] = full[j]
    return torch.stack([rows[p] for p in range(gbs)])


def test_union_of_micro_batches_is_the_global_batch_for_any_dp():
    # 37 samples and GBS 16: steps 2, 4 and 6 straddle an epoch boundary.
    samples = PackedSamples(np.arange(37 * 8 + 1, dtype=np.int64), seq_len=8)
    reference = GlobalBatchLoader(samples, 16, 16, 0, 1, seed=3)
    for step in range(7):
        expected = torch.from_numpy(reference.global_batch(step))
        for dp, mbs in [(1, 4), (2, 2), (2, 8), (4, 1), (4, 4)]:
            torch.testing.assert_close(_union_over_ranks(samples, 16, mbs, dp, step, 3), expected, rtol=0, atol=0)
    # Each epoch visits every sample once, and the order depends on the seed only.
    first_epochs = np.concatenate([reference.sample_ids(s) for s in range(7)])[: 3 * 37]
    for e in range(3):
        assert sorted(first_epochs[e * 37 : (e + 1) * 37]) == list(range(37))
    fresh = GlobalBatchLoader(samples, 16, 16, 0, 1, seed=3)  # a resumed run: no state but the step
    assert np.array_equal(fresh.global_batch(5), reference.global_batch(5))
    assert not np.array_equal(GlobalBatchLoader(samples, 16, 16, 0, 1, seed=4).sample_ids(0), reference.sample_ids(0))
    with pytest.raises(ValueError, match="global_batch_size=16"):
        GlobalBatchLoader(samples, 16, 3, 0, 2, seed=0)


def _write(prefix, docs, dtype=np.int32, lengths=None):
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for i, doc in enumerate(docs):
            writer.add_document(doc, None if lengths is None else lengths[i])


DOCS = [[1, 2, 3], [], [4], list(range(5, 40)), [65000, 0, 7]]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_indexed_round_trip(tmp_path, dtype):
    prefix = str(tmp_path / "corpus")
    lengths = [[1, 2], [], [1], [10, 0, 25], [3]]
    _write(prefix, DOCS, dtype, lengths)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype) and len(ds) == 7 and ds.n_documents == 5
    assert ds.document_indices.tolist() == [0, 2, 2, 3, 6, 7]
    sequences = [[1], [2, 3], [4], list(range(5, 15)), [], list(range(15, 40)), [65000, 0, 7]]
    assert [ds[i].tolist() for i in range(len(ds))] == sequences
    assert ds[-1].tolist() == [65000, 0, 7]
    assert [ds.document(j).tolist() for j in range(5)] == DOCS
    assert ds.tokens.tolist() == sum(DOCS, [])
    with pytest.raises(ValueError, match="do not fit"):
        _write(prefix + "_small", [[300]], np.uint8)


def test_indexed_files_match_megatron_core_both_ways(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    _write(ours, DOCS, np.uint16)
    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for doc in DOCS:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(theirs + ".idx")
    for ext in (".bin", ".idx"):  # same input, same bytes
        assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()

    for reader_prefix in (ours, theirs):
        mine, megatron = IndexedDataset(reader_prefix), MegatronDataset(reader_prefix)
        assert len(mine) == len(megatron) == len(DOCS)
        assert np.array_equal(mine.document_indices, megatron.document_indices)
        assert np.array_equal(mine.sequence_lengths, megatron.sequence_lengths)
        for i in range(len(DOCS)):
            assert megatron[i].dtype == mine[i].dtype and np.array_equal(megatron[i], mine[i])
    # A document split into several sequences survives the crossing too.
    split = str(tmp_path / "split")
    _write(split, [list(range(10)), [3, 4]], np.int32, [[4, 6], [2]])
    megatron = MegatronDataset(split)
    assert megatron.document_indices.tolist() == [0, 2, 3] and megatron[1].tolist() == [4, 5, 6, 7, 8, 9]


def test_failed_write_leaves_nothing_and_keeps_the_old_pair(tmp_path):
    prefix = str(tmp_path / "data")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    _write(prefix, [[1, 2, 3]])
    before = {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)}
    with pytest.raises(ValueError):
        with IndexedDatasetWriter(prefix, dtype=np.uint8) as writer:
            writer.add_document([4, 5])
            writer.add_document([-1])  # does not fit uint8: the whole write is abandoned
    assert {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)} == before
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]


def test_reader_refuses_mismatched_or_foreign_files(tmp_path):
    prefix = str(tmp_path / "data")
    _write(prefix, [[1, 2, 3], [4, 5]])
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0\0\0")  # a .bin from some other write
    with pytest.raises(ValueError, match="does not belong"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"PICKLE!!!")
    with pytest.raises(ValueError, match="not a Megatron indexed dataset"):
        IndexedDataset(prefix)


def test_token_range_is_computed_once_and_stored(tmp_path):
    import json

    from ds_parallel.data import indexed

    def stored(**change):
        with open(side) as fh:
            rec = json.load(fh)
        if change:
            with open(side, "w") as fh:
                json.dump(dict(rec, **change), fh)
        return rec

    prefix = str(tmp_path / "data")
    _write(prefix, [[5, 9, 3], [], [70000, 4]])  # int32
    side = prefix + indexed.RANGE_SUFFIX
    assert (stored()["min"], stored()["max"]) == (3, 70000)  # the writer's
    indexed._RANGES.clear()
    os.remove(side)  # as for a pair from Megatron's preprocessing: one pass, then stored
    assert IndexedDataset(prefix).token_range() == (3, 70000)
    assert stored()["max"] == 70000
    # The stored value is what later readers use: a planted one stamped for this .bin wins...
    indexed._RANGES.clear()
    stored(max=123)
    assert IndexedDataset(prefix).token_range() == (3, 123)
    # ... and one stamped for another .bin is ignored (a rewrite changes size or mtime).
    indexed._RANGES.clear()
    stored(bin_bytes=4)
    assert IndexedDataset(prefix).token_range() == (3, 70000)
    _write(prefix, [[1, 2]])
    assert IndexedDataset(prefix).token_range() == (1, 2)
    _write(prefix, [[]])
    assert IndexedDataset(prefix).token_range() is None


def test_build_datasets_arithmetic_and_indexed(tmp_path):
    train_cfg = TrainConfig(seq_len=16, seed=5)
    data = build_datasets(DataConfig(n_train=500, n_eval=20), train_cfg, vocab_size=128)
    tok = data.tokenizer
    assert len(data.heldout) == 20 and data.chance_accuracy == pytest.approx(0.01)
    text = tok.decode(data.train.tokens, keep_special=True).split("<eos>")
    assert text[:-1] == build_corpus(2, "+", 500, 20, seed=5).train and text[-1] == ""
    assert data.train[0].shape == (17,) and len(data.eval) > 0
    assert data.prompt_ids(data.heldout[0][0]) == [tok.eos_id] + tok.encode(data.heldout[0][0])
    with pytest.raises(ValueError, match="model.vocab_size=16"):
        build_datasets(DataConfig(n_train=500, n_eval=20), train_cfg, vocab_size=16)

    prefix = str(tmp_path / "tokens")
    _write(prefix, [list(range(40)), [99, 3]])
    cfg = DataConfig(source="indexed", path=prefix)
    data = build_datasets(cfg, train_cfg, vocab_size=100)
    assert data.tokenizer is None and data.heldout == [] and data.eval is None
    assert len(data.train) == 2 and data.train[1].tolist() == list(range(16, 33))
    with pytest.raises(ValueError, match=f"data.path='{prefix}'.*model.vocab_size=99"):
        build_datasets(cfg, train_cfg, vocab_size=99)


def test_answer_only_loss_mask():
    """data.loss_on=answer: labels are the answer digits and the EOS after them, else -100."""
    from ds_parallel.config import load_config

    cfg = load_config(None, ["train.seq_len=32"])
    data = build_datasets(cfg.data, cfg.train, 128)
    eq, eos = data.tokenizer.encode("=")[0], data.tokenizer.eos_id
    stream = data.train.tokens[: 8 * 32 + 1].tolist()
    # Walk the stream: a token is supervised iff an '=' came after the last EOS before it.
    truth, in_answer = [], False
    for tok in stream:
        truth.append(in_answer)
        in_answer = (in_answer or tok == eq) and tok != eos
    inputs, labels = data.train.inputs_and_labels(np.arange(8))
    for i in range(8):
        for t in range(32):
            pos = i * 32 + t + 1  # the label's position in the stream
            expected = stream[pos] if truth[pos] else -100
            assert labels[i, t].item() == expected, (i, t)
    assert 0.2 < (labels != -100).float().mean() < 0.6
    cfg_all = load_config(None, ["train.seq_len=32", "data.loss_on=all"])
    _, labels_all = build_datasets(cfg_all.data, cfg_all.train, 128).train.inputs_and_labels(np.arange(8))
    assert (labels_all != -100).all()


def test_cot_format_examples():
    assert format_cot(12, "+", 39, 2) == ("21+93=", "<think>2+9+0=11 1+3+1=50</think><answer>150</answer>")
    assert format_cot(70, "-", 8, 2) == ("07-80=", "<think>0-8-0=21 7-0-1=60</think><answer>26</answer>")
    assert format_cot(12, "*", 39, 2) == ("21*93=", "<think>21*9=8010 21*3=0630</think><answer>8640</answer>")
    assert format_cot(7, "+", 5, 1) == ("7+5=", "<think>7+5+0=21</think><answer>21</answer>")


def _check_working(prompt, think, n_digits):
    """Each step of the chain of thought is true arithmetic on the operands' digits (read from
    the prompt, least significant first), and the answer follows from the steps."""
    a_digits, op, b_digits = prompt[:n_digits], prompt[n_digits], prompt[n_digits + 1 : 2 * n_digits + 1]
    steps = think.split(" ")
    assert len(steps) == n_digits
    if op == "*":
        total = 0
        for j, step in enumerate(steps):
            lhs, partial = step.split("=")
            assert lhs == f"{a_digits}*{b_digits[j]}" and len(partial) == 2 * n_digits
            assert read_number(partial) == read_number(a_digits) * int(b_digits[j]) * 10**j
            total += read_number(partial)
        return total
    carry, digits = 0, []
    for i, step in enumerate(steps):
        lhs, (d, k) = step.split("=")
        x, y, c = lhs.split(op)
        assert (x, y, c) == (a_digits[i], b_digits[i], str(carry))
        signed = int(x) + int(y) + carry if op == "+" else int(x) - int(y) - carry
        assert signed == int(d) + (10 if op == "+" else -10) * int(k)
        carry, digits = int(k), digits + [d]
    return read_number("".join(digits) + (str(carry) if op == "+" else ""))


@pytest.mark.parametrize("n_digits,ops", [(1, "+-*"), (2, "+-*"), (3, "+-")])
def test_cot_corpus_completions_are_correct_and_formatted(n_digits, ops):
    from ds_parallel.rl.rewards import Sample, accuracy_reward, format_reward

    plain = build_corpus(n_digits, ops, n_train=3000, n_eval=50, seed=4)
    corpus = build_corpus(n_digits, ops, n_train=3000, n_eval=50, seed=4, cot=0.6)
    assert corpus.heldout == plain.heldout  # held-out stays (prompt, answer)
    n_cot = 0
    for text, plain_text in zip(corpus.train, plain.train):
        if "<think>" not in text:
            assert text == plain_text
            continue
        n_cot += 1
        cut = text.index("=") + 1
        prompt, completion = text[:cut], text[cut:]
        answer = plain_text[cut:]  # the same problem as without chain of thought
        assert plain_text[:cut] == prompt
        assert completion.endswith(f"</think><answer>{answer}</answer>")
        sample = Sample(prompt=prompt, completion=completion, answer=answer, task="arithmetic",
                        completion_tokens=len(completion), truncated=False)
        assert accuracy_reward(sample) == 1.0 and format_reward(sample) == 1.0
        think = completion[len("<think>") : completion.index("</think>")]
        assert _check_working(prompt, think, n_digits) == read_number(answer)
    assert n_cot == 1800  # round(0.6 * 3000), exactly
    CharTokenizer().encode("".join(corpus.train))  # every character is in the vocabulary
    assert build_corpus(n_digits, ops, 3000, 50, seed=4, cot=0.6) == corpus
    operands = [_parse(t, n_digits)[:3] for t in plain.train]
    assert build_corpus(n_digits, ops, 3000, 50, seed=4, cot=1.0).train == [
        "".join(format_cot(*problem, n_digits)) for problem in operands]
    with pytest.raises(ValueError, match=r"data.cot=1.5 must lie in \[0, 1\]"):
        build_corpus(n_digits, ops, 10, 5, seed=0, cot=1.5)


def test_cot_loss_mask_supervises_the_whole_completion():
    train_cfg = TrainConfig(seq_len=64, seed=5)
    data = build_datasets(DataConfig(n_train=300, n_eval=10, cot=0.5), train_cfg, vocab_size=128)
    tok = data.tokenizer
    problems = tok.decode(data.train.tokens, keep_special=True).split("<eos>")[:-1]
    assert sum("<think>" in p for p in problems) == 150
    # Expected mask, from the texts: after each problem's first '=' through its EOS.
    truth = []
    for text in problems:
        cut = text.index("=") + 1
        truth += [False] * cut + [True] * (len(text) - cut + 1)
    assert data.train.supervised.tolist() == truth
    inputs, labels = data.train.inputs_and_labels(np.arange(4))
    stream = data.train.tokens
    for i in range(4):
        pos = i * 64 + 1 + np.arange(64)
        expected = np.where(np.asarray(truth)[pos], stream[pos], -100)
        assert labels[i].tolist() == expected.tolist()
    with pytest.raises(ValueError, match="data.cot=-0.1 must lie in"):
        build_datasets(DataConfig(n_train=300, n_eval=10, cot=-0.1), train_cfg, vocab_size=128)
    with pytest.raises(ValueError, match="data.cot=0.5 writes arithmetic problems"):
        build_datasets(DataConfig(source="indexed", path="/nonexistent", cot=0.5), train_cfg, vocab_size=128)


# ---------------------------------------------------------------------------- blended sources (data/blend.py)

def _blend_loader(weights_by_step, gbs=20, mbs=20, dp=1, rank=0, sizes=(53, 29)):
    """Two sources whose windows are told apart by their tokens: source i's tokens are
    1000 * (i + 1) + position, so a window names its source and its place."""
    from ds_parallel.data.blend import BlendPhase, BlendedLoader

    sources = [PackedSamples(1000 * (i + 1) + np.arange(n * 4 + 1, dtype=np.int64), seq_len=4)
               for i, n in enumerate(sizes)]
    phases = [BlendPhase(step, tuple(w / sum(ws) for w in ws)) for step, ws in weights_by_step]
    return BlendedLoader(sources, phases, gbs, mbs, rank, dp, seed=5)


def test_blend_follows_its_weights_at_every_step_and_each_source_streams_its_epochs():
    loader = _blend_loader([(0, [0.7, 0.3])])
    seen = {0: [], 1: []}
    for step in range(40):
        batch = loader.global_batch(step)
        src = batch[:, 0] // 1000 - 1
        for s in (0, 1):
            seen[s] += [int(row[0] % 1000) // 4 for row in batch[src == s]]  # the window's index in its source
        # After every step the counts are within one sample of the weights (not only on average).
        counts = loader.samples_per_source(step + 1)
        assert counts.sum() == 20 * (step + 1) and np.abs(counts - np.array([0.7, 0.3]) * 20 * (step + 1)).max() <= 1
        assert [len(seen[0]), len(seen[1])] == counts.tolist()
    # Each source runs through its windows epoch by epoch, a seeded permutation each time.
    for s, n in ((0, 53), (1, 29)):
        for e in range(len(seen[s]) // n):
            assert sorted(seen[s][e * n:(e + 1) * n]) == list(range(n))
    # Pure function of the step (resume), and the union over dp ranks is the global batch.
    assert np.array_equal(_blend_loader([(0, [0.7, 0.3])]).global_batch(17), loader.global_batch(17))
    for step in (0, 9, 33):
        expected = torch.from_numpy(loader.global_batch(step))
        rows = {}
        for rank in range(2):
            ranked = _blend_loader([(0, [0.7, 0.3])], mbs=5, dp=2, rank=rank)
            for m, (inputs, labels) in enumerate(ranked.micro_batches(step)):
                full = torch.cat([inputs, labels[:, -1:]], 1)
                for j in range(5):
                    rows[(m * 2 + rank) * 5 + j] = full[j]
        torch.testing.assert_close(torch.stack([rows[p] for p in range(20)]), expected, rtol=0, atol=0)


def test_blend_weights_change_at_a_step_without_reshuffling_what_was_consumed():
    before = _blend_loader([(0, [0.7, 0.3])])
    after = _blend_loader([(0, [0.7, 0.3]), (25, [0.2, 0.8])])
    for step in range(25):  # up to the change, the same batches
        assert np.array_equal(before.global_batch(step), after.global_batch(step))
    consumed = after.samples_per_source(25)
    for step in range(25, 60):
        counts = after.samples_per_source(step + 1) - consumed
        assert np.abs(counts - np.array([0.2, 0.8]) * 20 * (step + 1 - 25)).max() <= 1
    # Each source's stream continues where it stopped: sample numbers 0, 1, 2, ... with no gap or repeat.
    for s in (0, 1):
        numbers = np.concatenate([after.slot_sources(step)[1][after.slot_sources(step)[0] == s] for step in range(60)])
        assert np.array_equal(numbers, np.arange(len(numbers)))


def test_blend_config_errors_are_one_line(tmp_path):
    from ds_parallel.config import ConfigError, load_config

    for i, n in enumerate((40, 30)):
        _write(str(tmp_path / f"s{i}"), [list(range(1, 20))] * n)
    blend = f"data.blend=[{{path: {tmp_path / 's0'}, weight: 3}}, {{path: {tmp_path / 's1'}, weight: 1}}]"
    base = ["data.source=indexed", "train.seq_len=16", blend]
    cfg = load_config(None, base)
    datasets = build_datasets(cfg.data, cfg.train, cfg.model.vocab_size)
    assert [len(s) for s in datasets.sources] == [(40 * 19 - 1) // 16, (30 * 19 - 1) // 16]  # 19-token documents
    for extra, message in [
        ([f"data.path={tmp_path / 's0'}"], "needs exactly one of data.path"),
        (["data.blend_schedule=[{step: 5, weights: [1]}]"], "data.blend_schedule[0].weights=[1] must be 2"),
        (["data.blend_schedule=[{step: 500, weights: [1, 1]}]"], "below train.steps=200"),
        (["train.eval_every=10"], "needs data.valid_path"),
        ([f"data.blend=[{{path: {tmp_path / 'nope'}, weight: 1}}]"], "data.blend[0].path="),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, base + extra)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
