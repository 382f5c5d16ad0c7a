"""Tokenised documents to Megatron indexed shards, the same bytes on any number of workers.

Two phases, as datatrove runs them:

1. `IndexedShardWriter` (a PipelineStep; one datatrove task = one shard): tokenises each
   document it receives (add_special_tokens off, and literal special-token strings in the text
   encoded as plain text, so a web page that contains "<｜end▁of▁sentence｜>" cannot plant an
   EOD), appends the EOD id and writes `<shard_dir>/<rank:05d>_text_document.bin/.idx` with
   IndexedDatasetWriter (data/indexed.py; one document = one sequence). Beside it,
   `<rank:05d>.docs.json` lists, per document, its order key, source, dump and token count;
   it is written last (atomically), so it marks a finished shard.
2. `merge_shards` (or the `MergeShards` step, one task): orders every document of every
   shard by its key and writes `<prefix>_text_document.bin/.idx` in that order, then
   `<prefix>.manifest.json`. The key depends on the document alone, never on which task
   read it, so 1, 2 or 4 workers (any task count) give byte-identical outputs.

Order key. `document_order_key(doc)` is (file, position): the reader's `file_path` metadata
and the id datatrove's readers give a line without an id, "<path>/<n>", split into its path
and the number n, so documents keep input order. Documents with ids of their own sort by
(file, id). Two documents with one key make the order depend on the partition: the merge
refuses them, naming the id.

Token dtype: megatron-core's rule (DType.optimal_dtype), uint16 for a vocabulary of fewer
than 65,500 ids and int32 otherwise, so Megatron's own tools would pick the same; it is
chosen from the model's vocabulary size (the padded one by default: ids up to it can occur).

Manifest (`sort_keys`, so its bytes are reproducible too): the tokenizer's hash (sha256 of its
canonical JSON, prep/tokenizer.py), EOD id, vocabulary and dtype, totals, and documents and
tokens per source and per dump (`tokens` counts what is in the .bin, EOD included); a caller
adds its own sections (documents in, filter counts) through `extra`. Every file is replaced
atomically; the manifest is written last, so a manifest describes the .bin beside it.

Resuming. A task killed midway leaves no `.docs.json` (and at most temporaries or an old
pair); datatrove reruns it (no completion marker) and it rewrites its shard whole; the merge
reruns from the finished shards. A shard directory belongs to one run's task count: shards
left by a run with more tasks repeat keys, and the merge refuses them. The merge keeps one
key per document in memory; at web scale merge per group of shards (megatron-core blends
several prefixes) instead of into one file.
"""
from __future__ import annotations

import glob
import heapq
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from ds_parallel.atomic import write_atomic
from ds_parallel.data.indexed import DOCUMENT_SUFFIX, MANIFEST_SUFFIX, IndexedDataset, IndexedDatasetWriter
from ds_parallel.data.prep.tokenizer import eod_id, load_tokenizer, model_vocab_size, tokenizer_hash

SUFFIX = DOCUMENT_SUFFIX
DOCS_SUFFIX = ".docs.json"
UNKNOWN = "unknown"  # source / dump of a document without that metadata
_NUMBERED_ID = re.compile(r"^(.*)/(\d+)$")

OrderKey = tuple[str, str, int]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 ids, else int32 (megatron-core DType.optimal_dtype)."""
    return np.dtype(np.uint16 if vocab_size < 65_500 else np.int32)


def document_order_key(doc: Document) -> OrderKey:
    """(file, id stem, position): input order for datatrove readers' "<path>/<n>" ids."""
    file = str(doc.metadata.get("file_path", ""))
    m = _NUMBERED_ID.match(doc.id)
    return (file, m.group(1), int(m.group(2))) if m else (file, doc.id, -1)


class IndexedShardWriter(PipelineStep):
    """Tokenises the task's documents into shard `<shard_dir>/<rank:05d>` (module doc,
    phase 1) and passes them on with metadata token_count."""

    name = "indexed shards"
    type = "TOKENIZER"

    def __init__(self, shard_dir: str, tokenizer_path: str, vocab_size: Optional[int] = None,
                 eod_token: Optional[str] = None, batch_size: int = 256,
                 order_key: Callable[[Document], OrderKey] = document_order_key, preset: Optional[str] = None,
                 tp: int = 1) -> None:
        """vocab_size: the model's (token dtype); None = model_vocab_size(tokenizer, preset, tp).
        The tokenizer is read when a task runs: a pipeline may plan this step before an earlier
        stage has written it (data/prep/pipeline.py)."""
        super().__init__()
        self.shard_dir, self.tokenizer_path = str(shard_dir), str(tokenizer_path)
        self.requested_vocab, self.eod_token, self.preset, self.tp = vocab_size, eod_token, preset, tp
        self.batch_size, self.order_key = batch_size, order_key

    def _setup(self):
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.eod = eod_id(tokenizer, self.eod_token)
        self.tokenizer_hash = tokenizer_hash(tokenizer)
        n_ids = tokenizer.get_vocab_size(with_added_tokens=True)
        self.vocab_size = (model_vocab_size(tokenizer, self.preset, self.tp) if self.requested_vocab is None
                           else int(self.requested_vocab))
        if self.vocab_size < n_ids:
            raise ValueError(f"model.vocab_size={self.vocab_size} is below the tokenizer's {n_ids} ids")
        tokenizer.encode_special_tokens = True  # text is text: no special ids from page contents
        return tokenizer

    def _encode(self, tokenizer, batch: list[Document]) -> Iterator[tuple[Document, list[int]]]:
        for doc, enc in zip(batch, tokenizer.encode_batch([d.text for d in batch], add_special_tokens=False)):
            yield doc, enc.ids + [self.eod]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tokenizer = self._setup()
        os.makedirs(self.shard_dir, exist_ok=True)
        stem = os.path.join(self.shard_dir, f"{rank:05d}")
        if os.path.exists(stem + DOCS_SUFFIX):  # a finished-shard mark must never outlive its shard
            os.remove(stem + DOCS_SUFFIX)
        records = []
        with IndexedDatasetWriter(stem + SUFFIX, dtype=token_dtype(self.vocab_size)) as writer:
            batch: list[Document] = []
            for doc in data or ():
                batch.append(doc)
                if len(batch) < self.batch_size:
                    continue
                yield from self._write(tokenizer, batch, writer, records)
                batch = []
            yield from self._write(tokenizer, batch, writer, records)
        write_atomic(stem + DOCS_SUFFIX, json.dumps({
            "tokenizer_hash": self.tokenizer_hash, "eod_id": self.eod,
            "vocab_size": self.vocab_size, "documents": records}))

    def _write(self, tokenizer, batch, writer, records) -> DocumentsPipeline:
        for doc, ids in self._encode(tokenizer, batch):
            writer.add_document(ids)
            records.append([list(self.order_key(doc)), str(doc.metadata.get("source", UNKNOWN)),
                            str(doc.metadata.get("dump", UNKNOWN)), len(ids)])
            self.stat_update("tokens", value=len(ids))
            doc.metadata["token_count"] = len(ids)
            yield doc


def _bump(table: dict, key: str, n_tokens: int) -> None:
    row = table.setdefault(key, {"documents": 0, "tokens": 0})
    row["documents"] += 1
    row["tokens"] += n_tokens


def merge_shards(shard_dir: str, prefix: str, extra: Optional[Mapping[str, Any]] = None,
                 sources: Optional[set[str]] = None) -> dict:
    """Merge every finished shard of `shard_dir` into `<prefix>_text_document.bin/.idx` and
    `<prefix>.manifest.json` (module doc, phase 2); returns the manifest. `sources`: only the
    documents of these sources (one dataset per source, for remixing)."""
    metas = sorted(glob.glob(os.path.join(glob.escape(str(shard_dir)), "*" + DOCS_SUFFIX)))
    if not metas:
        raise ValueError(f"{shard_dir} holds no finished shard (*{DOCS_SUFFIX}): run the shard step first")
    shards, keyed = [], []
    for s, path in enumerate(metas):
        with open(path) as fh:
            meta = json.load(fh)
        ds = IndexedDataset(path[: -len(DOCS_SUFFIX)] + SUFFIX)
        if ds.n_documents != len(meta["documents"]):
            raise ValueError(f"{path} lists {len(meta['documents'])} documents, its shard has {ds.n_documents}")
        shards.append((meta, ds))
        # Each shard's documents sorted by key; heapq.merge then interleaves the shards.
        keyed.append(sorted((tuple(rec[0]), s, j) for j, rec in enumerate(meta["documents"])
                            if sources is None or rec[1] in sources))
    first = shards[0][0]
    for (meta, ds), path in zip(shards, metas):
        for field in ("tokenizer_hash", "eod_id", "vocab_size"):
            if meta[field] != first[field]:
                raise ValueError(f"{path}: {field} {meta[field]} differs from {metas[0]}'s {first[field]}: "
                                 f"shards of one output must come from one tokenizer")
        if ds.dtype != shards[0][1].dtype:
            raise ValueError(f"{path}: dtype {ds.dtype} differs from {metas[0]}'s {shards[0][1].dtype}")

    totals = {"documents": 0, "tokens": 0}
    by_source: dict = {}
    by_dump: dict = {}
    previous = None
    with IndexedDatasetWriter(str(prefix) + SUFFIX, dtype=shards[0][1].dtype) as writer:
        for key, s, j in heapq.merge(*keyed):
            if key == previous:
                raise ValueError(f"two documents share the order key {key}: give every document a unique id "
                                 f"so the output does not depend on the number of workers")
            previous = key
            meta, ds = shards[s]
            tokens = ds.document(j)
            writer.add_document(tokens)
            _, source, dump, n_tokens = meta["documents"][j]
            totals["documents"] += 1
            totals["tokens"] += int(n_tokens)
            _bump(by_source, source, int(n_tokens))
            _bump(by_dump, dump, int(n_tokens))
    manifest = {
        "tokenizer_hash": first["tokenizer_hash"], "eod_id": first["eod_id"], "vocab_size": first["vocab_size"],
        "dtype": str(shards[0][1].dtype), "data_prefix": os.path.basename(str(prefix)) + SUFFIX,
        **totals, "sources": by_source, "dumps": by_dump, **dict(extra or {}),
    }
    write_atomic(str(prefix) + MANIFEST_SUFFIX, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


class MergeShards(PipelineStep):
    """`merge_shards` as a one-task datatrove step (e.g. a Slurm job depending on the shard job)."""

    name = "merge indexed shards"
    type = "TOKENIZER"

    def __init__(self, shard_dir: str, prefix: str, extra: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self.shard_dir, self.prefix, self.extra = str(shard_dir), str(prefix), dict(extra or {})

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != 1:
            raise ValueError(f"the merge is one task; it was given tasks={world_size}")
        merge_shards(self.shard_dir, self.prefix, self.extra)
        yield from data or ()
