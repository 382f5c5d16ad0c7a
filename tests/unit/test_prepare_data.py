"""launchers/prepare_data.py end to end (data/prep/pipeline.py): a generated corpus with planted
near-duplicates in two sources and three dumps through dedup, filters, BPE training and
Megatron shards, run by datatrove's local executor.

- The output does not depend on the number of workers (1 and 4 give the same bytes), and a run
  stopped after the dedup stages and rerun gives the bytes of an uninterrupted one.
- megatron-core's IndexedDataset reads it, and each document decodes to the text that the
  plain-function API (dedup_documents, apply_filters: the same math without datatrove) keeps,
  in input order, plus the EOD.
- Remix writes one dataset per source and the blend config training reads.
- Bad settings are refused with one line before anything runs; a rerun with other settings in
  the same work folder is refused and writes nothing.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from ds_parallel.config import load_config
from ds_parallel.data.prep.synthetic import make_corpus, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILTERS = "{length: {min_chars: 600}, gopher_repetition: {}}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    c = make_corpus(seed=3, n_singletons=120, pairs_per_target=8, n_dumps=3, words=(60, 200))
    return c, write_jsonl(c, str(raw))


def _overrides(inputs, out, workers=1, *extra):
    return [f"data_prep.inputs={json.dumps(inputs)}", f"data_prep.output={out}", f"data_prep.filters={FILTERS}",
            "data_prep.tokenizer.preset=deepseek_v3", "data_prep.tokenizer.vocab_size=600",
            "data_prep.remix={web: 3, books: 1}", "data_prep.executor.tasks=4",
            f"data_prep.executor.workers={workers}", *extra]


def _prepare(inputs, out, workers=1, *extra, stop_after=None):
    from ds_parallel.data.prep.pipeline import check_prep, run

    cfg = load_config(None, _overrides(inputs, out, workers, *extra))
    check_prep(cfg.data_prep)
    return run(cfg, stop_after=stop_after)


def _outputs(out):
    names = ["_text_document.bin", "_text_document.idx", ".manifest.json", ".tokenizer.json", ".blend.yaml",
             "_web_text_document.bin", "_books_text_document.bin"]
    files = {n: open(str(out) + n, "rb").read() for n in names}
    files[".blend.yaml"] = files[".blend.yaml"].replace(str(out).encode(), b"OUT")  # it names its datasets' paths
    return files


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    _, inputs = corpus
    tmp = tmp_path_factory.mktemp("prep")
    manifest = _prepare(inputs, tmp / "one" / "out", 1)
    _prepare(inputs, tmp / "four" / "out", 4)
    _prepare(inputs, tmp / "cut" / "out", 2, stop_after="merge")  # stopped after the dedup stages
    assert not os.path.exists(tmp / "cut" / "out_text_document.bin")
    _prepare(inputs, tmp / "cut" / "out", 2)
    return tmp, manifest


def test_output_is_the_same_for_any_worker_count_and_after_a_stop(runs):
    tmp, _ = runs
    one = _outputs(tmp / "one" / "out")
    assert _outputs(tmp / "four" / "out") == one
    assert _outputs(tmp / "cut" / "out") == one


def test_documents_decode_to_what_the_plain_api_keeps(corpus, runs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from ds_parallel.data.prep.dedup import DedupConfig, dedup_documents
    from ds_parallel.data.prep.filters import apply_filters, build_filters
    from ds_parallel.data.prep.tokenizer import eod_id, load_tokenizer

    c, inputs = corpus
    tmp, manifest = runs
    # Documents as the 4 tasks read them (task r: files r, r + 4, ...): the keep rule keeps the
    # first of a cluster in that order. The output is in file order.
    files = []
    for entry in inputs:
        with open(entry["path"]) as fh:
            files.append([(json.loads(line)["text"], entry["dump"], entry["source"]) for line in fh])
    order = [(f, n) for r in range(4) for f in range(r, len(files), 4) for n in range(len(files[f]))]
    texts, dumps, sources = zip(*(files[f][n] for f, n in order))
    keep = dedup_documents(list(texts), list(dumps), list(sources), DedupConfig(mode="global")).keep
    kept = {key for key, k in zip(order, keep) if k}
    texts = [doc[0] for f in range(len(files)) for doc in files[f]]
    survivors = [files[f][n][0] for f in range(len(files)) for n in range(len(files[f])) if (f, n) in kept]
    filtered, counts = apply_filters(survivors, build_filters({"length": {"min_chars": 600},
                                                               "gopher_repetition": {}}))
    expected = [d.text if hasattr(d, "text") else d for d in filtered]
    assert 0 < len(expected) < len(survivors) < len(texts)  # both steps removed something

    out = str(tmp / "one" / "out")
    tok = load_tokenizer(out + ".tokenizer.json")
    ds = IndexedDataset(out + "_text_document")
    assert len(ds) == manifest["documents"] == len(expected)
    eod = eod_id(tok)
    for i, text in enumerate(expected):
        ids = ds[i].tolist()
        assert ids[-1] == eod and eod not in ids[:-1]
        assert tok.decode(ids[:-1], skip_special_tokens=False) == text, i
    assert manifest["tokens"] == sum(len(ds[i]) for i in range(len(ds)))
    removed = manifest["dedup"]["steps"]
    assert removed["exact"]["removed"]["documents"] + removed["minhash"]["removed"]["documents"] == \
        len(texts) - len(survivors)
    assert manifest["filters"]["length"]["removed"] + manifest["filters"]["gopher_repetition"]["removed"] == \
        len(survivors) - len(expected)
    assert [r["dumps"] for r in manifest["dedup"]["dedup_rate_by_dumps"]] == [1, 2, 3]
    # Remix: one dataset per source, together the whole output, and the blend config.
    per_source = {s: IndexedDataset(f"{out}_{s}_text_document") for s in ("web", "books")}
    assert sum(len(d) for d in per_source.values()) == len(ds)
    assert {s: manifest["sources"][s]["documents"] for s in per_source} == {s: len(d) for s, d in per_source.items()}
    import yaml

    blend = yaml.safe_load(open(out + ".blend.yaml"))["data"]["blend"]
    assert [(b["name"], b["weight"]) for b in blend] == [("books", 0.25), ("web", 0.75)]
    assert manifest["vocab_size"] % 128 == 0 and manifest["dtype"] == "uint16"


def test_bad_settings_are_refused_in_one_line_and_nothing_is_written(corpus, tmp_path):
    _, inputs = corpus
    out = tmp_path / "out"
    cli = [sys.executable, os.path.join(ROOT, "launchers", "prepare_data.py"), "--config",
           os.path.join(ROOT, "configs", "data", "demo_cpu.yaml")]
    from ds_parallel.data.prep.pipeline import check_prep

    for extra, message in [
        (["data_prep.filters={nope: {}}"], "filters.nope is not a filter"),
        (["data_prep.tokenizer.path=/no/such.json"], "needs exactly one of preset"),
        (["data_prep.inputs=[{path: /no/such/*.jsonl}]"], "matches no file"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            check_prep(load_config(None, _overrides(inputs, out) + extra).data_prep)
        assert "\n" not in str(err.value)
    # Through the launcher: exit 2, one line on stderr, before anything runs.
    proc = subprocess.run(cli + _overrides(inputs, out) + ["data_prep.remix={news: 1}"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 2 and "data_prep.remix.news: no input has source 'news'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists(tmp_path / "out.work") and not os.path.exists(str(out) + "_text_document.bin")
    # The dry run prints the stages and writes nothing.
    proc = subprocess.run(cli + _overrides(inputs, out) + ["--dry-run"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0 and "buckets" in proc.stdout and "14 task(s)" in proc.stdout, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out.work")


def test_a_rerun_with_other_settings_is_refused(corpus, runs):
    tmp, _ = runs
    _, inputs = corpus
    before = _outputs(tmp / "one" / "out")
    with pytest.raises(ValueError, match="was made with other data_prep settings"):
        _prepare(inputs, tmp / "one" / "out", 1, "data_prep.dedup.rows=4")
    assert _outputs(tmp / "one" / "out") == before
    _prepare(inputs, tmp / "one" / "out", 3)  # another worker count is the same job: resumes, same bytes
    assert _outputs(tmp / "one" / "out") == before
    assert np.array_equal(np.fromfile(str(tmp / "one" / "out") + "_text_document.bin", dtype=np.uint16),
                          np.frombuffer(before["_text_document.bin"], dtype=np.uint16))


def test_training_config_is_checked_against_the_manifest_vocabulary(runs):
    from ds_parallel.config import ConfigError

    tmp, manifest = runs
    data = [f"data.source=indexed", f"data.path={tmp / 'one' / 'out'}_text_document", "train.seq_len=16"]
    with pytest.raises(ConfigError, match=f"model.vocab_size=128 is below the {manifest['vocab_size']} of the "
                                          f"tokenizer"):
        load_config(None, data)
    load_config(None, data + [f"model.vocab_size={manifest['vocab_size']}"])



def test_inputs_read_jsonl_parquet_and_text_with_their_source_and_dump(tmp_path):
    """Each input kind as the reader gives it to the stages: a JSONL line, a parquet row, a whole
    text file is one document, with id "<file>/<n>" and the entry's source and dump; task r of W
    reads files r, r + W, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ds_parallel.data.prep.pipeline import InputReader, input_files

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["three", "four"], "url": ["u3", "u4"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("five\nstill five")
    cfg = load_config(None, [f"data_prep.inputs=[{{path: {tmp_path}/a.jsonl, source: web, dump: d1}}, "
                             f"{{path: '{tmp_path}/[bc].*', source: books, dump: d2}}]"])
    files = input_files(cfg.data_prep)
    assert [(os.path.basename(f.path), f.source, f.dump) for f in files] == [
        ("a.jsonl", "web", "d1"), ("b.parquet", "books", "d2"), ("c.txt", "books", "d2")]
    reader = InputReader(files)
    docs = [d for r in range(2) for d in reader.run(None, r, 2)]
    assert [(d.text, d.id.split("/")[-2:], d.metadata["source"], d.metadata["dump"]) for d in docs] == [
        ("one", ["a.jsonl", "0"], "web", "d1"), ("two", ["a.jsonl", "2"], "web", "d1"),  # task 0: files 0 and 2
        ("five\nstill five", ["c.txt", "0"], "books", "d2"),
        ("three", ["b.parquet", "0"], "books", "d2"), ("four", ["b.parquet", "1"], "books", "d2")]
    (tmp_path / "a.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match="a.jsonl line 1: no string 'text' field"):
        list(reader.run(None, 0, 1))
