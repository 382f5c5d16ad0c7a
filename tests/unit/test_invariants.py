"""Invariants of docs/architecture.md that are about where code lives, read from the source
itself (an AST walk over ds_parallel/, launchers/ and benchmarks/, nothing imported):

    1  process groups are created only in parallel/groups.py
    6  Transformer Engine is imported only in fp8/te.py
    7  nothing is unpickled: no pickle module, torch.load only with weights_only=True,
       numpy loads without allow_pickle
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOTS = ("ds_parallel", "launchers", "benchmarks")


def _sources() -> dict[str, ast.AST]:
    out = {}
    for root in ROOTS:
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    with open(path) as fh:
                        out[os.path.relpath(path, REPO)] = ast.parse(fh.read(), path)
    return out


SOURCES = _sources()


def _called_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _kwarg(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_scan_sees_the_code():
    """The rules below are only as good as the walk: it must find the known places."""
    groups = SOURCES[os.path.join("ds_parallel", "parallel", "groups.py")]
    assert any(isinstance(n, ast.Call) and _called_name(n) == "new_group" for n in ast.walk(groups))
    te = SOURCES[os.path.join("ds_parallel", "fp8", "te.py")]
    assert any(m.startswith("transformer_engine") for m in _imported_modules(te))


def test_process_groups_are_created_only_in_groups_py():
    allowed = os.path.join("ds_parallel", "parallel", "groups.py")
    offenders = [path for path, tree in SOURCES.items() if path != allowed
                 for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and _called_name(n) in ("new_group", "init_device_mesh", "new_subgroups")]
    assert not offenders, f"process groups created outside {allowed}: {offenders}"


def test_transformer_engine_is_imported_only_in_fp8_te():
    allowed = os.path.join("ds_parallel", "fp8", "te.py")
    offenders = [path for path, tree in SOURCES.items() if path != allowed
                 if any(m.split(".")[0] == "transformer_engine" for m in _imported_modules(tree))]
    assert not offenders, f"transformer_engine imported outside {allowed}: {offenders}"


@pytest.mark.parametrize("path", sorted(SOURCES))
def test_nothing_is_unpickled(path):
    tree = SOURCES[path]
    assert not {"pickle", "dill", "cloudpickle"} & {m.split(".")[0] for m in _imported_modules(tree)}, path
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        name = _called_name(n)
        if name == "load" and isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch":
            assert _kwarg(n, "weights_only") is True, f"{path}:{n.lineno}: torch.load without weights_only=True"
        if name in ("load", "loadtxt") and _kwarg(n, "allow_pickle") is True:
            assert False, f"{path}:{n.lineno}: numpy load with allow_pickle=True"
