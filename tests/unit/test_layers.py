"""The import contracts in .importlinter (docs/architecture.md, "Layers") hold, and they bite:
`lint-imports` passes on the source, and fails on a copy of it with a model -> train import
and a Transformer Engine import outside fp8/te.py planted in it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint_imports(root: str) -> subprocess.CompletedProcess:
    assert os.path.exists(LINT_IMPORTS), (
        f"{LINT_IMPORTS} is missing: install the test extra (pip install -e '.[test]')")
    # lint-imports puts its working directory first on sys.path, so `root`'s ds_parallel is
    # the one analysed; --no-cache leaves nothing behind in the tree.
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})


def test_import_contracts_hold():
    out = _lint_imports(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("Layers: each package imports only the layers below it", "ds_parallel.model never imports ds_parallel.train",
                 "Only ds_parallel.fp8.te imports transformer_engine"):
        assert f"{name} KEPT" in out.stdout, out.stdout


def test_planted_imports_break_the_contracts(tmp_path):
    shutil.copy(os.path.join(REPO, ".importlinter"), tmp_path)
    shutil.copytree(os.path.join(REPO, "ds_parallel"), tmp_path / "ds_parallel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "ds_parallel" / "model" / "norm.py", "a") as fh:
        fh.write("\nfrom ds_parallel.train import engine  # planted\n")
    with open(tmp_path / "ds_parallel" / "moe" / "router.py", "a") as fh:
        fh.write("\n\ndef _planted():\n    import transformer_engine.pytorch  # noqa: F401\n")
    out = _lint_imports(str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ds_parallel.model never imports ds_parallel.train BROKEN" in out.stdout, out.stdout
    assert "Only ds_parallel.fp8.te imports transformer_engine BROKEN" in out.stdout, out.stdout
    assert "ds_parallel.model.norm -> ds_parallel.train.engine" in out.stdout, out.stdout
    assert "ds_parallel.moe.router -> transformer_engine" in out.stdout, out.stdout
