"""Our checkpoint format: layout-free, atomic, verified, pickle-free (docs/architecture.md,
"Checkpoints"). This module is the format itself: the files, how a step directory is
published, and how it is verified before anything reads it.

A checkpoint is a directory `checkpoints/step_<N>/`:

    meta.json                 step, layout, resolved config, and every other file of the
                              checkpoint with its byte size and sha256
    shard-<rank>.safetensors  pieces of parameters, fp32 master weights and AdamW moments,
                              each under its global name, with its ShardSpecs in the header
    rng-<rank>.safetensors    each rank's RNG state

Every tensor is stored by global parameter name with the ShardSpecs that place it in the
full tensor, so a checkpoint saved under one (tp, ep, dp, zero) layout loads under
another: the reader (reader.py) rebuilds each full tensor from whatever pieces exist and
cuts its own.

Writing (writer.py fills the directory): `begin_checkpoint` makes `.tmp_step_<N>/`; every
rank writes its files there, then hashes and fsyncs them (each rank its own files, in
parallel); rank 0 gathers the sizes and hashes, and `publish_checkpoint` writes meta.json,
renames the directory to `step_<N>` and then replaces `latest` (ds_parallel/atomic.py:
temp, fsync, rename, directory fsync). Re-saving an existing step first renames the old
directory to `.old_step_<N>`, and removes that only once the new one is in place; a reader
that finds `step_<N>` missing falls back to that aside, so a crash at any point leaves a
complete checkpoint under `latest`. The next save cleans what a crash left (`.tmp_step_*`,
restored or removed `.old_step_*`).

Reading (`latest_checkpoint`, `verify_checkpoint`, and so every CheckpointReader) refuses,
with one CheckpointError line naming the file or tensor, before anything is copied into a
model: a `latest` that does not name a `step_<N>` directory directly inside
`checkpoints/`; a listed file missing, of another size or another sha256; a header that
does not parse; a tensor whose pieces do not cover its full shape. sha256 (OpenSSL,
streamed in 8 MiB chunks, ~0.5-2 GB/s a core) catches any corruption, not just truncation;
at save each rank hashes only its own files, and at load a process group splits the
hashing over its ranks. Safetensors and JSON only; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from typing import Any

import torch.distributed as dist
from safetensors import safe_open

from ds_parallel.atomic import fsync_dir, write_atomic
from ds_parallel.parallel.shard import ShardSpec, local_index

FORMAT_VERSION = 2  # 2: meta.json lists every file with its size and sha256
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
STEP_DIR = re.compile(r"step_\d+")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.safetensors")  # no paths, no dot-files
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (missing, truncated, corrupt, incomplete) or a
    bad `latest` pointer. The message is one line naming the file or tensor."""


# ---------------------------------------------------------------------------- writing
def begin_checkpoint(ckpt_root: str, step: int) -> str:
    """One process: clean what interrupted saves left, return a fresh `.tmp_step_<step>`."""
    os.makedirs(ckpt_root, exist_ok=True)
    for entry in os.scandir(ckpt_root):
        aside = re.fullmatch(r"\.old_(step_\d+)", entry.name)
        if re.fullmatch(r"\.tmp_step_\d+", entry.name):
            _remove(entry.path)
        elif aside and os.path.lexists(os.path.join(ckpt_root, aside[1])):
            _remove(entry.path)  # the re-save finished: the aside is the superseded copy
        elif aside:
            os.replace(entry.path, os.path.join(ckpt_root, aside[1]))  # it did not: restore
    tmp = os.path.join(ckpt_root, f".tmp_step_{step}")
    os.makedirs(tmp)
    fsync_dir(ckpt_root)
    return tmp


def publish_checkpoint(ckpt_root: str, step: int, meta: dict[str, Any],
                       files: dict[str, dict] | None = None) -> str:
    """One process, after every file of `.tmp_step_<step>` is written (and, when `files` is
    given, hashed and fsynced by its writer): meta.json with the file list, then the
    renames. `files` maps file name -> file_digest(); None digests the directory here."""
    tmp = os.path.join(ckpt_root, f".tmp_step_{step}")
    if files is None:
        files = {f: file_digest(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp)) if f != "meta.json"}
    for fname, want in files.items():  # rank 0 must see every rank's file: a shared filesystem
        path = os.path.join(tmp, fname)
        if not os.path.isfile(path) or os.path.getsize(path) != want["bytes"]:
            raise CheckpointError(f"{path} (written by another rank) is missing or of another size here: "
                                  f"train.out_dir must be on a filesystem every node shares")
    write_atomic(os.path.join(tmp, "meta.json"), json.dumps({**meta, "files": files}, indent=1))
    final = os.path.join(ckpt_root, f"step_{step}")
    aside = os.path.join(ckpt_root, f".old_step_{step}")
    replacing = os.path.lexists(final)
    if replacing:  # the old copy stays readable (latest_checkpoint falls back to it) until the new is in place
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(ckpt_root)
    write_atomic(os.path.join(ckpt_root, "latest"), f"step_{step}\n")
    if replacing:
        _remove(aside)
    return final


def file_digest(path: str) -> dict[str, Any]:
    """Byte size and sha256 of a written file, which is fsynced on the way."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
        os.fsync(fh.fileno())
        size = fh.tell()
    return {"bytes": size, "sha256": h.hexdigest()}


def _remove(path: str) -> None:
    """Never follows a symlink out of the checkpoints directory."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


# ---------------------------------------------------------------------- verification
def latest_checkpoint(run_dir: str, group=None) -> str | None:
    """The verified checkpoint `checkpoints/latest` names, None without a pointer; else
    CheckpointError. With `group` (every rank of it calls), see verify_checkpoint."""
    root = os.path.join(run_dir, "checkpoints")
    pointer = os.path.join(root, "latest")
    if not os.path.lexists(pointer):
        return None
    try:
        with open(pointer) as fh:
            name = fh.read(256).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint pointer {pointer}: {exc}") from None
    if not STEP_DIR.fullmatch(name):
        raise CheckpointError(f"checkpoint pointer {pointer} names {name[:80]!r}, not a step_<N> directory of {root}; "
                              f"write one there or remove the pointer to start afresh")
    path = os.path.join(root, name)
    if not os.path.lexists(path) and os.path.isdir(os.path.join(root, f".old_{name}")):
        path = os.path.join(root, f".old_{name}")  # a re-save of this step was interrupted mid-swap
    if os.path.islink(path) or not os.path.isdir(path):
        raise CheckpointError(f"checkpoint pointer {pointer} names {name}, which is not a directory in {root}")
    verify_checkpoint(path, group)
    return path


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, "meta.json")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{ckpt_dir}: checkpoint format {version} != {FORMAT_VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(_FILE_NAME.fullmatch(f) and isinstance(d, dict) and isinstance(
            d.get("bytes"), int) and isinstance(d.get("sha256"), str) for f, d in files.items()):
        raise CheckpointError(f"{path}: no valid file list (name -> bytes, sha256)")
    return meta


# Directories verified in this process, by their files' (name, size, mtime, inode): the
# trainer's latest_checkpoint and its CheckpointReader then hash the files once.
_VERIFIED: dict[str, tuple] = {}


def verify_checkpoint(ckpt_dir: str, group=None) -> dict[str, Any]:
    """Raise CheckpointError (one line) unless every file meta.json lists is there with its
    size and sha256, every shard header parses, and every tensor's pieces cover its full
    shape. Returns meta. With a process group, every rank of it calls: the hashing is split
    over its ranks and every rank raises the same error."""
    error, meta = None, None
    split = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
    try:
        meta = read_meta(ckpt_dir)
        names = sorted(meta["files"])
        signature = _signature(ckpt_dir, meta["files"])  # checks existence and size
        _check_coverage(ckpt_dir, [n for n in names if n.startswith("shard-")])
        if _VERIFIED.get(os.path.realpath(ckpt_dir)) != signature:
            share = names[dist.get_rank(group)::dist.get_world_size(group)] if split else names
            for fname in share:
                if file_digest(os.path.join(ckpt_dir, fname))["sha256"] != meta["files"][fname]["sha256"]:
                    raise CheckpointError(f"{os.path.join(ckpt_dir, fname)}: sha256 differs from meta.json (corrupt)")
    except CheckpointError as exc:
        error = str(exc)
    if split:
        errors: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)
    _VERIFIED[os.path.realpath(ckpt_dir)] = signature
    return meta


def _signature(ckpt_dir: str, files: dict[str, dict]) -> tuple:
    out = []
    for fname in ["meta.json", *sorted(files)]:
        path = os.path.join(ckpt_dir, fname)
        try:
            st = os.stat(path)
        except OSError:
            raise CheckpointError(f"{path} is missing (the checkpoint is incomplete)") from None
        want = files[fname]["bytes"] if fname in files else st.st_size
        if st.st_size != want:
            raise CheckpointError(f"{path} has {st.st_size} bytes, meta.json lists {want} (truncated or corrupt)")
        out.append((fname, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _check_coverage(ckpt_dir: str, shard_files: list[str]) -> None:
    """Each piece's stored shape is its ShardSpec region, and each tensor's regions cover
    its full shape: the reader will never read a gap. Headers only; no tensor data."""
    regions: dict[str, tuple[tuple[int, ...], list[tuple[slice, ...]]]] = {}
    for fname in shard_files:
        path = os.path.join(ckpt_dir, fname)
        try:
            with safe_open(path, framework="pt") as f:
                header = json.loads((f.metadata() or {})["specs"])
                stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            pieces = {key: (tuple(spec["full_shape"]), tuple(ShardSpec(*s) for s in spec["shards"]))
                      for key, spec in header.items()}
        except Exception as exc:  # safetensors' own error types differ across versions
            why = (str(exc).splitlines() or [""])[0][:200]
            raise CheckpointError(f"{path}: unreadable shard header ({type(exc).__name__}: {why})") from None
        for key, (shape, specs) in pieces.items():
            index = tuple(slice(s.start or 0, n if s.stop is None else s.stop)
                          for s, n in zip(local_index(specs, shape), shape))
            if stored.get(key) != tuple(s.stop - s.start for s in index):
                raise CheckpointError(f"{path}: tensor {key!r} has shape {stored.get(key)}, its specs say "
                                      f"{tuple(s.stop - s.start for s in index)}")
            full, regions_of_key = regions.setdefault(key, (shape, []))
            if full != shape:
                raise CheckpointError(f"{path}: tensor {key!r} has full shape {shape}, other pieces say {full}")
            regions_of_key.append(index)
    for key, (shape, pieces) in regions.items():
        gap = _uncovered(shape, pieces)
        if gap is not None:
            where = ", ".join(f"{lo}:{hi}" for lo, hi in gap)
            raise CheckpointError(f"{ckpt_dir}: tensor {key!r} of shape {shape} has no piece for [{where}] "
                                  f"(the checkpoint is incomplete)")


def _uncovered(shape: tuple[int, ...], pieces: list[tuple[slice, ...]]) -> tuple | None:
    """A region of `shape` in no piece, or None. The pieces' boundaries cut the tensor into
    a grid (a handful of cells: pieces are tp/ep blocks); each cell must lie in some piece."""
    cuts = [sorted({0, n, *(p[d].start for p in pieces), *(p[d].stop for p in pieces)}) for d, n in enumerate(shape)]
    for cell in itertools.product(*(list(zip(c[:-1], c[1:])) for c in cuts)):
        if not any(all(p[d].start <= lo and hi <= p[d].stop for d, (lo, hi) in enumerate(cell)) for p in pieces):
            return cell
    return None

