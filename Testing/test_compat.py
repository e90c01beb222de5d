"""Versions DeepWML must keep working with: the Python of Slicer 5.4-5.8 (3.9), torch before 2.5 (no
`dynamo` argument to torch.onnx.export) and before 2.3 (no torch.amp.GradScaler), and a clear message
on a Slicer older than 5.4. README, Supported versions, says what was checked and how."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

# The Python of Slicer 5.4, 5.6 and 5.8 (3.9.10); Slicer 5.10 has 3.12.
SLICER_PYTHON = (3, 9)
# Names that Python 3.9 lacks, by module.
NEWER_NAMES = {
    "typing": {"TypeAlias", "ParamSpec", "Concatenate", "TypeGuard", "Self", "LiteralString", "Never", "Unpack",
               "TypeVarTuple", "NotRequired", "Required", "assert_never", "assert_type", "reveal_type",
               "dataclass_transform", "override", "is_typeddict"},
    "itertools": {"pairwise", "batched"},
    "datetime": {"UTC"},
    "enum": {"StrEnum", "verify", "ReprEnum"},
    "contextlib": {"chdir", "aclosing"},
}
NEWER_MODULES = {"tomllib"}
NEWER_KEYWORDS = {"zip": "strict", "dataclass": "slots", "field": "kw_only"}


def slicer_sources() -> list[Path]:
    """Every file that runs inside Slicer's Python: the module, its library and script, and DeepWMLLib."""
    return sorted([*(REPO / "DeepWML").rglob("*.py"), *(REPO / "DeepWMLLib").glob("*.py")])


def problems(source: str, name: str = "<source>") -> list[str]:
    """What in `source` needs a newer Python than SLICER_PYTHON."""
    found = []
    try:
        tree = ast.parse(source, name, feature_version=SLICER_PYTHON)
    except SyntaxError as exc:
        return [f"{name}:{exc.lineno}: {exc.msg}"]
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    annotations = set()
    for node in ast.walk(tree):
        for value in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if value is not None:
                annotations.update(id(part) for part in ast.walk(value))
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            if id(node) in annotations and not future:
                found.append(f"{where}: X | Y in an annotation without 'from __future__ import annotations'")
            elif id(node) not in annotations and any(_is_type(side) for side in (node.left, node.right)):
                found.append(f"{where}: X | Y of types evaluated at run time")
        elif isinstance(node, ast.ImportFrom) and node.module in NEWER_NAMES:
            found += [f"{where}: {node.module}.{a.name}" for a in node.names if a.name in NEWER_NAMES[node.module]]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            found += [f"{where}: module {m}" for m in modules if m in NEWER_MODULES]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in NEWER_NAMES.get(node.value.id, ()):
                found.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            function = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if function in NEWER_KEYWORDS and any(k.arg == NEWER_KEYWORDS[function] for k in node.keywords):
                found.append(f"{where}: {function}({NEWER_KEYWORDS[function]}=)")
    return found


def _is_type(node) -> bool:
    return ((isinstance(node, ast.Constant) and node.value is None) or
            (isinstance(node, ast.Name) and node.id in {"str", "int", "float", "bool", "bytes", "list", "dict",
                                                         "tuple", "set", "type", "Path"}))


def test_the_code_that_runs_in_slicer_needs_no_python_newer_than_slicers():
    files = slicer_sources()
    assert len(files) > 25
    found = [p for path in files for p in problems(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not found, found


@pytest.mark.parametrize("snippet", [
    "match x:\n    case 1: pass\n",
    "def f(x: int | None): pass\n",
    "from __future__ import annotations\nAlias = str | None\n",
    "from __future__ import annotations\nisinstance(1, int | float)\n",
    "import tomllib\n",
    "from typing import Self\n",
    "import datetime\nnow = datetime.datetime.now(datetime.UTC)\n",
    "for a, b in zip([1], [2], strict=True): pass\n",
    "from dataclasses import dataclass\n@dataclass(slots=True)\nclass A:\n    x: int\n",
])
def test_the_check_finds_what_python_3_9_cannot_run(snippet):
    assert problems(snippet)


def test_the_check_passes_what_python_3_9_runs():
    assert not problems("from __future__ import annotations\ndef f(x: int | None) -> list[str] | None:\n"
                        "    return None\nflags = 1 | 2\n")


def test_onnx_export_works_with_a_torch_without_the_dynamo_argument(tiny_model, tmp_path, monkeypatch):
    """torch.onnx.export has `dynamo` from torch 2.5 on. Before: with torch 2.0-2.4 the export raised
    TypeError, so ONNX Runtime and OpenVINO were never used (a warning, then slower PyTorch)."""
    pytest.importorskip("onnxruntime")
    from DeepWMLLib import inference
    from DeepWMLLib.checkpoint import load_model

    real = torch.onnx.export
    calls = []

    def export_of_torch_2_4(model, args, f, export_params=True, verbose=False, training=None, input_names=None,
                            output_names=None, operator_export_type=None, opset_version=None,
                            do_constant_folding=True, dynamic_axes=None, keep_initializers_as_inputs=None,
                            custom_opsets=None, export_modules_as_functions=False, autograd_inlining=True):
        calls.append(input_names)
        kwargs = {"dynamo": False} if "dynamo" in inspect.signature(real).parameters else {}
        return real(model, args, f, input_names=input_names, output_names=output_names, opset_version=opset_version,
                    dynamic_axes=dynamic_axes, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_of_torch_2_4)
    loaded = load_model(tiny_model)
    target = inference.OnnxRunner._export(loaded, tmp_path / "tiny.onnx")
    assert target.is_file() and calls == [["flair"]]


def test_training_runs_with_a_torch_before_2_3(tmp_path, monkeypatch):
    """torch.amp.GradScaler is new in torch 2.3. Before: `deepwml train` stopped with AttributeError on
    torch 2.0-2.2, on the CPU too."""
    from test_train import make_dataset, tiny_config

    from DeepWMLLib import train

    monkeypatch.delattr(torch.amp, "GradScaler")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch calls torch.cuda.amp.GradScaler deprecated
        best = train.train(tiny_config(make_dataset(tmp_path / "data", n_cases=4, slices=4), epochs=1),
                           tmp_path / "run")
        assert Path(best).is_file()
        assert not train.grad_scaler(False).is_enabled()


def test_training_seeds_its_generators_with_numpy_1():
    """Before: with numpy 1.x (1.25 and 1.26 are allowed by pyproject) `deepwml train` stopped at its first
    epoch with TypeError: ufunc 'right_shift' not supported (a uint64 shifted by a Python int). The seed
    is the same as before under numpy 2."""
    import numpy as np

    from DeepWMLLib.train import _torch_generator

    expected = int(np.random.SeedSequence([3, 1, 0]).generate_state(1, dtype=np.uint64)[0]) >> 1
    assert _torch_generator(3, 1, 0).initial_seed() == expected


def test_an_older_slicer_is_told_which_slicer_the_module_needs(monkeypatch):
    """Before: Slicer 5.2 and older failed to load the module with "No module named
    'slicer.parameterNodeWrapper'"."""
    import slicer_fixtures  # puts DeepWML/ on sys.path
    import slicer
    import slicer_standins

    assert str(slicer_fixtures.MODULE_DIR) in sys.path
    slicer_standins.install(monkeypatch)
    monkeypatch.setattr(slicer.app, "applicationVersion", "5.2.2", raising=False)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", None)  # absent, as in Slicer 5.2
    monkeypatch.delitem(sys.modules, "DeepWML", raising=False)
    with pytest.raises(ImportError, match=r"DeepWML needs 3D Slicer 5\.4 or newer .* this is Slicer 5\.2\.2"):
        importlib.import_module("DeepWML")
    sys.modules.pop("DeepWML", None)


def test_a_python_without_pytorch_is_told_to_install_it(tmp_path):
    """Slicer's Python, or a venv made without `pip install torch`, has no PyTorch: with no exported copy of the
    models cached, `deepwml segment` (which reads the model files with it) ended in 'internal error:
    ModuleNotFoundError: No module named 'torch' (rerun with --debug and report it)'. It says what is missing and
    how to install it, in the command line, in a cohort's failed cases and in the Slicer batch script alike."""
    import subprocess

    from DeepWMLLib.errors import case_error

    script = ("import sys; sys.modules['torch'] = None\n"  # `import torch` then fails as without PyTorch
              "from DeepWMLLib.cli import run\n"
              f"run(['segment', {str(REPO / 'Resources' / 'Sample' / 'sample_flair.nii.gz')!r}, '-o', 'out'])\n")
    env = {**__import__("os").environ, "DEEPWML_CACHE_DIR": str(tmp_path / "empty_cache"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert "internal error" not in done.stderr
    assert "PyTorch is not installed" in done.stderr and "pip install torch==2.13.0" in done.stderr

    with pytest.raises(ModuleNotFoundError) as other:
        importlib.import_module("torch_is_not_here")
    assert case_error(other.value).startswith("internal error: ModuleNotFoundError")  # only PyTorch is named so
    missing = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert case_error(missing).startswith("PyTorch is not installed")
