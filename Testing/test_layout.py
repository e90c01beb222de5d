"""Project rules a packaged extension and the library's users depend on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    for command in ("segment", "evaluate", "consensus", "synth", "train", "bench", "adapt", "change", "export"):
        assert command in proc.stdout


def _copy_of_the_project(destination: Path) -> Path:
    """The project as a fresh clone has it (no build output, caches or virtual environment), to build from: a
    build in the repository itself would leave build/ and *.egg-info there."""
    import shutil

    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "*.egg-info", "__pycache__", "runs", "sample_out", "Testing"))
    return destination


def _wheel(source: Path, outdir: Path) -> Path:
    """The wheel `pip install SOURCE` builds (a folder or an sdist), built with the setuptools installed here."""
    pytest.importorskip("setuptools", minversion="77")  # pyproject.toml's build requirement
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(outdir), str(source)], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [wheel] = outdir.glob("deepwml-*.whl")
    return wheel


def _shipped_files() -> set[str]:
    """What `deepwml segment` and `deepwml bench` read from Resources/ by default: the registry, every model it
    names (the default WMH model, the brain-mask model and those --model NAME picks), the model card the
    registry refers to, the sample FLAIR."""
    import json

    registry = json.loads((REPO / "Resources" / "Models" / "models.json").read_text(encoding="utf-8"))
    return {"Models/models.json", "Models/README.md", "Sample/sample_flair.nii.gz",
            *(f"Models/{entry['file']}" for entry in registry["models"])}


def test_a_non_editable_install_segments_with_the_shipped_models(tmp_path):
    """`pip install .` (or git+URL, or a wheel) installed DeepWMLLib without Resources/, so `deepwml segment`
    failed on every scan with 'no model registry at .../site-packages/Resources/Models/models.json' and
    `deepwml bench` found no sample; only the editable install of README's set-up worked."""
    import zipfile

    import SimpleITK as sitk

    wheel = _wheel(_copy_of_the_project(tmp_path / "src"), tmp_path / "dist")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    assert {f"DeepWMLLib/Resources/{name}" for name in _shipped_files()} <= names
    assert not any("Screenshots" in name or name.startswith(("Resources/", "Testing/")) for name in names)
    # The unpacked wheel as the only DeepWMLLib there is (site-packages), run from elsewhere on a scan away from the
    # source tree: four slices of the sample, for speed.
    work = tmp_path / "work"
    work.mkdir()
    sample = sitk.ReadImage(str(REPO / "Resources" / "Sample" / "sample_flair.nii.gz"))
    sitk.WriteImage(sample[:, :, 8:12], str(work / "flair.nii.gz"))
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPWML_MODELS_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    code = ("import DeepWMLLib, sys; from DeepWMLLib import bench, segment; "
            "print(DeepWMLLib.__file__, bench.SAMPLE.is_file(), segment.default_role_model_path('intracranial')); "
            "from DeepWMLLib.cli import run; "
            "sys.argv = ['deepwml', 'segment', 'flair.nii.gz', '-o', 'out', '--backend', 'torch']; run()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=work, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    module, sample, brain_model = proc.stdout.split()[:3]
    assert Path(module).is_relative_to(site) and sample == "True" and Path(brain_model).is_relative_to(site)
    assert (work / "out" / "flair_wmh.nii.gz").is_file()


def test_the_sdist_builds_a_wheel_with_the_shipped_models(tmp_path):
    """`python -m build` (and PyPI) build the wheel from the sdist, which held only DeepWMLLib, README and LICENSE:
    a wheel built from it had no models to ship, however the wheel itself were configured."""
    import tarfile
    import zipfile

    pytest.importorskip("setuptools", minversion="77")
    source = _copy_of_the_project(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path / "sdist")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=source, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sdist = tmp_path / "sdist" / proc.stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", *(f"Resources/{name}" for name in _shipped_files())} <= names
    with zipfile.ZipFile(_wheel(sdist, tmp_path / "dist")) as archive:
        assert {f"DeepWMLLib/Resources/{name}" for name in _shipped_files()} <= set(archive.namelist())


def test_help_and_errors_name_the_shipped_files_where_this_install_keeps_them(tmp_path, tiny_model):
    """A wheel (`pip install .`) keeps the shipped models and sample inside the package, in DeepWMLLib/Resources,
    but `deepwml segment --help` and --save-ventricle-mask's error sent its users to Resources/Models/models.json
    and Resources/Models/deepwml_vent8_synth_v1.pt, and `deepwml bench --help` to Resources/Sample, none of them
    there. They now name this install's files (here in a folder whose name holds a %, which argparse formats)."""
    import shutil

    package = tmp_path / "site 100%" / "DeepWMLLib"
    shutil.copytree(REPO / "DeepWMLLib", package, ignore=shutil.ignore_patterns("__pycache__"))
    models = package / "Resources" / "Models"
    models.mkdir(parents=True)
    (models / "models.json").write_text('{"models": []}', encoding="utf-8")  # no brain or ventricle model
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPWML_MODELS_DIR", "PYTHONPATH")}
    env.update(PYTHONPATH=str(package.parent), COLUMNS="1000")  # help lines not wrapped

    def deepwml(*args):
        return subprocess.run([sys.executable, "-m", "DeepWMLLib.cli", *args], capture_output=True, text=True,
                              encoding="utf-8", errors="replace", cwd=tmp_path, env=env, timeout=300)

    ventricle_model = models / "deepwml_vent8_synth_v1.pt"
    shown = deepwml("segment", "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"({models / 'models.json'}, e.g. ensemble-v8)" in shown.stdout
    assert f"the shipped one, {ventricle_model}, is opt-in" in shown.stdout
    shown = deepwml("bench", "--help")
    assert f"the bundled sample, {package / 'Resources' / 'Sample' / 'sample_flair.nii.gz'})" in shown.stdout
    refused = deepwml("segment", "scan.nii.gz", "-o", "out", "--model", str(tiny_model), "--save-ventricle-mask")
    assert refused.returncode == 2 and f"(the shipped, opt-in one: {ventricle_model})" in refused.stderr, refused.stderr
