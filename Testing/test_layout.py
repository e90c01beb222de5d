"""Project rules a packaged extension and the library's users depend on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_library_never_imports_slicer_qt_vtk_ctk():
    modules = sorted(p.stem for p in (REPO / "DeepWMLLib").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('DeepWMLLib.' + m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('slicer', 'qt', 'vtk', 'ctk', 'vtkmodules')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "DeepWMLLib.cli", "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0
    for command in ("segment", "evaluate", "consensus", "synth", "train", "bench"):
        assert command in proc.stdout
