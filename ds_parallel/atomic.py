"""Files replaced atomically and durably: the one home of write-temp, fsync, rename, fsync-dir.

A reader of `path` sees the old file or the new one, never a torn one (rename is atomic
within a directory on POSIX), and once `atomic_open` returns the new contents and the
rename itself survive a power loss (the file is fsynced before the rename, the directory
after it). The temporary is `<path>.tmp.<pid>`, beside the target and distinct per process,
so concurrent writers of one path (ranks on a shared filesystem) never write into each
other's temporary; the last rename wins.

Torch-free and at the bottom of the layers (checkpoints, run directories and `data/` all
write through it).
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """`with atomic_open(path, "wb") as fh: ...` writes `path` as a whole, or not at all:
    an exception inside the block removes the temporary and leaves `path` untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open replaces whole files: mode 'w' or 'wb', not {mode!r}")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_atomic(path: str, data: str | bytes) -> None:
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


def fsync_file(path: str) -> None:
    """For a file written by someone else's writer (safetensors, numpy) before its rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Makes the renames and creations inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems cannot fsync a directory; renames are theirs to order
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)
