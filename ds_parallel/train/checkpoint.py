"""Layout-free, atomic, verified, pickle-free checkpoints (docs/architecture.md, "Checkpoints").

A checkpoint is a directory `checkpoints/step_<N>/`:

    meta.json                 step, layout, resolved config, and every other file of the
                              checkpoint with its byte size and sha256
    shard-<rank>.safetensors  pieces of parameters, fp32 master weights and AdamW moments,
                              each under its global name, with its ShardSpecs in the header
    rng-<rank>.safetensors    each rank's RNG state

Every tensor is stored by global parameter name with the ShardSpecs that place it in the
full tensor, so a checkpoint saved under one (tp, ep, dp, zero) layout loads under
another: the loader rebuilds each full tensor from whatever pieces exist and cuts its own.
Optimizer moments come from DeepSpeed gathered to full (per-parameter) shape over data
parallel, whatever the ZeRO stage, via its fragment API (`deepspeed.utils.tensor_fragment`).

Writing: every rank writes its files into `.tmp_step_<N>/`, then hashes and fsyncs them
(each rank its own files, in parallel); rank 0 gathers the sizes and hashes, writes
meta.json, fsyncs the directory, renames it to `step_<N>` and then replaces `latest`
(written, fsynced, renamed, directory fsynced). Re-saving an existing step first renames
the old directory to `.old_step_<N>`, and removes that only once the new one is in place;
a reader that finds `step_<N>` missing falls back to that aside, so a crash at any point
leaves a complete checkpoint under `latest`. The next save cleans what a crash left
(`.tmp_step_*`, restored or removed `.old_step_*`).

Reading (`latest_checkpoint`, `verify_checkpoint`, `CheckpointReader`) refuses, with one
CheckpointError line naming the file or tensor, before anything is copied into a model:
a `latest` that does not name a `step_<N>` directory directly inside `checkpoints/`; a
listed file missing, of another size or another sha256; a header that does not parse; a
tensor whose pieces do not cover its full shape. sha256 (OpenSSL, streamed in 8 MiB
chunks, ~0.5-2 GB/s a core) catches any corruption, not just truncation; at save each rank
hashes only its own files, and at load a process group splits the hashing over its ranks.
Loading uses safetensors and JSON only; nothing is unpickled.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ds_parallel.parallel.shard import ShardSpec, full_shape, local_index, local_shape, shards_of

FORMAT_VERSION = 2  # 2: meta.json lists every file with its size and sha256
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
STEP_DIR = re.compile(r"step_\d+")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.safetensors")  # no paths, no dot-files
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (missing, truncated, corrupt, incomplete) or a
    bad `latest` pointer. The message is one line naming the file or tensor."""


def _spec_json(specs: tuple[ShardSpec, ...]) -> list[list]:
    return [[s.dim, s.index, s.count, s.group] for s in specs]


# ---------------------------------------------------------------- optimizer state access
# ZeRO 1/2 and DeepSpeed's bf16 optimizer keep fp32 masters in flat per-group partitions;
# each model parameter's `_hp_mapping` says which slice of which flat tensor holds which
# slice of the parameter (the mapping DeepSpeed's universal checkpoint uses). We read the
# AdamW moments through that mapping directly from the base optimizer's state, keyed by
# the flat tensor, rather than through DeepSpeed's per-fragment cache, which in 0.19.8
# stays empty for every group but the first.

def _flat_slices(param: torch.Tensor):
    """(flat fp32 partition, slice of it, slice of the flattened param) or None."""
    m = getattr(param, "_hp_mapping", None)
    if m is None:
        return None
    flat = m.hp_fragment._base if m.hp_fragment._base is not None else m.hp_fragment
    hp, lp = m.hp_fragment_address, m.lp_fragment_address
    return flat, slice(hp.start, hp.start + hp.numel), slice(lp.start, lp.start + lp.numel)


def _full_optimizer_state(engine, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp32 master and AdamW moments of `param` at its local (TP/EP-sharded) shape,
    gathered over data parallel. Collective over the param's data-parallel group."""
    if hasattr(param, "ds_id"):  # ZeRO-3: DeepSpeed gathers its partitions for us
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {"master": safe_get_full_fp32_param(param)}
        for key in ADAM_KEYS:
            out[key] = safe_get_full_optimizer_state(param, key)
        return {k: v.view(param.ds_shape) for k, v in out.items()}
    state = engine.basic_optimizer.state
    if hasattr(param, "_hp_mapping"):
        out = {}
        where = _flat_slices(param)
        for key in ("master", *ADAM_KEYS):
            # On the param's device: NCCL reduces only CUDA tensors (saved via .cpu()).
            buf = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            if where is not None:
                flat, hp, lp = where
                src = flat if key == "master" else state[flat][key]
                buf[lp] = src[hp].float()
            dist.all_reduce(buf, group=param._dp_group)  # pieces are disjoint: the sum assembles
            out[key] = buf.view(param.shape)
        return out
    st = state.get(param, {})
    out = {"master": param.detach().float()}
    for key in ADAM_KEYS:
        out[key] = st[key] if key in st else torch.zeros_like(param, dtype=torch.float32)
    return out


def _optimizer_step_count(engine) -> int:
    for state in engine.basic_optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _materialise_optimizer_state(engine, step: int) -> None:
    """AdamW creates its state lazily at the first step; resume needs it now: zero moments
    with the saved step count for every tensor the base optimizer owns."""
    opt = engine.basic_optimizer
    owned = [p for group in opt.param_groups for p in group["params"]]
    # ZeRO-3 swaps its flat fp32 sub-groups in and out of the base optimizer's groups.
    owned += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    dtype = getattr(opt, "moment_dtype", None)  # train/optim.py keeps moments in bf16
    for p in owned:
        if p not in opt.state or "exp_avg" not in opt.state[p]:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
            }


def _set_optimizer_state(engine, param: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(param, values["master"])
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(param, values[key], key)
        return
    state = engine.basic_optimizer.state
    if hasattr(param, "_hp_mapping"):
        where = _flat_slices(param)
        if where is not None:
            flat, hp, lp = where
            for key in ("master", *ADAM_KEYS):
                dst = flat if key == "master" else state[flat][key]
                dst[hp] = values[key].flatten()[lp].to(device=dst.device, dtype=dst.dtype)
        return
    for key in ADAM_KEYS:
        state[param][key].copy_(values[key])


# ---------------------------------------------------------------------------- saving
def _owns(param: torch.Tensor, ctx) -> bool:
    """One writer per distinct piece: dp rank 0 for replicated pieces, expert-dp rank 0 for
    expert-parallel pieces (those are replicated over edp only)."""
    if any(s.group == "ep" for s in shards_of(param)):
        return ctx.edp_rank == 0
    return ctx.dp_rank == 0


def save_checkpoint(run_dir: str, step: int, engine, ctx, config_dict: dict[str, Any]) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    tmp = os.path.join(ckpt_root, f".tmp_step_{step}")
    if ctx.rank == 0:
        begin_checkpoint(ckpt_root, step)
    if dist.is_initialized():
        dist.barrier()

    module = engine.module
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for name, param in module.named_parameters():
        state = _full_optimizer_state(engine, param)  # collective over dp: every rank calls
        if not _owns(param, ctx):
            continue
        spec = {"full_shape": list(full_shape(param)), "shards": _spec_json(shards_of(param))}
        for key, value in state.items():
            tensors[f"{name}::{key}"] = value.detach().float().reshape(local_shape(param)).contiguous().cpu()
            header[f"{name}::{key}"] = spec
    for name, buf in module.named_buffers():
        if name.split(".")[-1] in _non_persistent(module, name) or ctx.dp_rank != 0:
            continue
        tensors[f"{name}::buffer"] = buf.detach().cpu().contiguous()
        header[f"{name}::buffer"] = {"full_shape": list(full_shape(buf)), "shards": _spec_json(shards_of(buf))}
    mine = [f"shard-{ctx.rank:05d}.safetensors", f"rng-{ctx.rank:05d}.safetensors"]
    save_file(tensors, os.path.join(tmp, mine[0]), metadata={"specs": json.dumps(header)})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(tmp, mine[1]))
    files = {fname: file_digest(os.path.join(tmp, fname)) for fname in mine}  # also fsyncs them
    if dist.is_initialized() and dist.get_world_size() > 1:  # also the barrier: every file is written
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, files)
        files = {k: v for d in per_rank for k, v in d.items()}

    error = [None]
    if ctx.rank == 0:
        layout = {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "ep": ctx.ep, "dp": ctx.dp}
        meta = {"format_version": FORMAT_VERSION, "step": step, "optimizer_step": _optimizer_step_count(engine),
                "layout": layout, "config": config_dict}
        try:
            publish_checkpoint(ckpt_root, step, meta, files)
        except CheckpointError as exc:  # every rank raises it, none waits on a barrier
            error = [str(exc)]
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise CheckpointError(error[0])
    return os.path.join(ckpt_root, f"step_{step}")


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
    _fsync_dir(ckpt_root)
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
    _write_durably(os.path.join(tmp, "meta.json"), json.dumps({**meta, "files": files}, indent=1))
    _fsync_dir(tmp)
    final = os.path.join(ckpt_root, f"step_{step}")
    aside = os.path.join(ckpt_root, f".old_step_{step}")
    replacing = os.path.lexists(final)
    if replacing:  # the old copy stays readable (latest_checkpoint falls back to it) until the new is in place
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    pointer = os.path.join(ckpt_root, "latest")
    _write_durably(pointer + ".tmp", f"step_{step}\n")
    os.replace(pointer + ".tmp", pointer)
    _fsync_dir(ckpt_root)
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


def _write_durably(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems cannot fsync a directory; renames are theirs to order
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """Never follows a symlink out of the checkpoints directory."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def _non_persistent(module: torch.nn.Module, buffer_name: str) -> set[str]:
    owner = module
    for part in buffer_name.split(".")[:-1]:
        owner = getattr(owner, part)
    return owner._non_persistent_buffers_set


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


# --------------------------------------------------------------------------- loading
class CheckpointReader:
    """Rebuilds full tensors from the saved pieces of any layout and cuts local pieces.
    Construction verifies the checkpoint (verify_checkpoint; free after latest_checkpoint)."""

    def __init__(self, ckpt_dir: str, group=None):
        self.dir = ckpt_dir
        self.meta = verify_checkpoint(ckpt_dir, group)
        self.index: dict[str, list[tuple[str, dict]]] = {}
        for fname in sorted(self.meta["files"]):  # only the listed files: a stray one is never read
            if not fname.startswith("shard-"):
                continue
            path = os.path.join(ckpt_dir, fname)
            with safe_open(path, framework="pt") as f:
                header = json.loads(f.metadata()["specs"])
            for key, spec in header.items():
                self.index.setdefault(key, []).append((path, spec))

    def has(self, key: str) -> bool:
        return key in self.index

    def check(self, wanted: dict[str, torch.Tensor]) -> None:
        """Every key is present at the full shape of its local tensor: checked for all
        before anything is copied."""
        for key, like in wanted.items():
            if key not in self.index:
                raise CheckpointError(f"{self.dir} has no tensor {key!r} (saved from another model?)")
            shape = tuple(self.index[key][0][1]["full_shape"])
            if shape != full_shape(like):
                raise CheckpointError(f"{self.dir}: {key} has shape {shape}, the model's is {full_shape(like)}")

    def full(self, key: str) -> torch.Tensor:
        pieces = self.index.get(key)
        if not pieces:
            raise CheckpointError(f"{self.dir} has no tensor {key!r}")
        shape = tuple(pieces[0][1]["full_shape"])
        out = None
        for path, spec in pieces:  # verified: the pieces cover `shape`, so nothing stays empty
            specs = tuple(ShardSpec(*s) for s in spec["shards"])
            with safe_open(path, framework="pt") as f:
                piece = f.get_tensor(key)
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            out[local_index(specs, shape)] = piece
        return out

    def local(self, key: str, like: torch.Tensor) -> torch.Tensor:
        self.check({key: like})
        full = self.full(key)
        return full[local_index(shards_of(like), tuple(full.shape))]

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        fname = f"rng-{rank:05d}.safetensors"
        if fname not in self.meta["files"]:
            return None
        with safe_open(os.path.join(self.dir, fname), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}


def load_model_weights(module: torch.nn.Module, reader: CheckpointReader) -> None:
    """Before the engine exists: parameters from fp32 masters, persistent buffers as saved."""
    params = dict(module.named_parameters())
    buffers = {name: buf for name, buf in module.named_buffers() if reader.has(f"{name}::buffer")}
    reader.check({**{f"{n}::master": p for n, p in params.items()}, **{f"{n}::buffer": b for n, b in buffers.items()}})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(reader.local(f"{name}::master", param).to(param.dtype))
        for name, buf in buffers.items():
            buf.copy_(reader.local(f"{name}::buffer", buf))


def load_optimizer_state(engine, reader: CheckpointReader, meta: dict[str, Any], rank: int, same_layout: bool) -> None:
    """After the engine exists: AdamW moments, step count, fp32 masters, RNG."""
    params = dict(engine.module.named_parameters())
    reader.check({f"{name}::{key}": p for name, p in params.items() for key in ("master", *ADAM_KEYS)})
    _materialise_optimizer_state(engine, meta["optimizer_step"])
    with torch.no_grad():
        for name, param in params.items():
            values = {key: reader.local(f"{name}::{key}", param) for key in ("master", *ADAM_KEYS)}
            _set_optimizer_state(engine, param, values)
    rng = reader.rng(rank) if same_layout else None
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
