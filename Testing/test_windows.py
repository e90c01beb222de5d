"""What differs on Windows, checked on any system: names of drive roots, renames that Windows refuses
while another program has the file open, and names Windows does not allow (io.WINDOWS set by the test)."""

from __future__ import annotations

import ntpath
import os
import time
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest

from DeepWMLLib import io
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError


def test_a_drive_root_has_a_case_name(monkeypatch):
    # `deepwml segment E:\ OUT` on a hospital CD: the case was named "" (outputs _wmh.nrrd, .seg.nrrd)
    assert io.case_name("/") == "root"
    monkeypatch.setattr(io, "Path", PureWindowsPath)
    monkeypatch.setattr(io.os.path, "abspath", ntpath.abspath)
    assert io.case_name("E:\\") == "drive_E"
    assert io.case_name("e:/") == "drive_E"
    assert io.case_name("\\\\server\\scans\\") == "server_scans"
    assert io.case_name("E:\\DICOM\\P1") == "P1"
    assert io.case_name("C:\\data\\sub-01_FLAIR.nii.gz") == "sub-01_FLAIR"


def _refusing_replace(monkeypatch, refusals: int) -> list:
    """os.replace refused with Windows' PermissionError `refusals` times (a file open elsewhere), then done."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) <= refusals:
            raise PermissionError(13, "Access is denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(io, "WINDOWS", True, raising=False)
    monkeypatch.setattr(io, "REPLACE_TRIES_S", (0.0,) * 5, raising=False)
    monkeypatch.setattr(io.os, "replace", replace)
    return calls


def test_a_rename_refused_for_a_moment_is_tried_again(tmp_path, monkeypatch):
    # a virus scanner or the search indexer opening the new file: the output failed at once
    path = tmp_path / "summary.csv"
    path.write_text("old\n", encoding="utf-8")
    calls = _refusing_replace(monkeypatch, 2)
    io.write_text("case\np1\n", path)
    assert path.read_text(encoding="utf-8") == "case\np1\n" and len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_a_file_kept_open_says_so(tmp_path, monkeypatch):
    # the summary open in Excel: "Access is denied; check free space and permissions" named neither
    path = tmp_path / "summary.csv"
    path.write_text("old\n", encoding="utf-8")
    _refusing_replace(monkeypatch, 100)
    with pytest.raises(DeepWMLError, match="open in another program"):
        io.write_text("case\np1\n", path)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]  # no temporary file left


def test_an_outline_series_refused_for_a_moment_is_put_in_place(tmp_path, monkeypatch):
    # --dicom-outline: a virus scanner reading the new series' images, or a viewer with the earlier series open,
    # refuses the folder's rename for a moment: the case failed with "cannot write the outline series"
    import SimpleITK as sitk

    from conftest import make_volume, write_dicom_series
    from DeepWMLLib import dicom_outline

    image, truth = make_volume(size=(24, 20, 3), spacing=(0.9, 0.9, 5.0), dtype=sitk.sitkInt16)
    folder = write_dicom_series(tmp_path / "flair", image, description="FLAIR")
    series, _ = io.choose_dicom_series(folder)
    prepared = dicom_outline.outline_series(io.read_image(folder, series=series), truth, series, {})
    out = tmp_path / "out"
    out.mkdir()
    calls = _refusing_replace(monkeypatch, 2)
    assert dicom_outline.write_outline_series(prepared, out / "P1_outline_dicom")["images"] == 3
    assert len(calls) == 3 and len(list((out / "P1_outline_dicom").iterdir())) == 3
    calls = _refusing_replace(monkeypatch, 2)  # --overwrite: the earlier series moved aside, the new one put in
    assert dicom_outline.write_outline_series(prepared, out / "P1_outline_dicom", overwrite=True)["images"] == 3
    assert len(calls) == 4 and [p.name for p in out.iterdir()] == ["P1_outline_dicom"]
    _refusing_replace(monkeypatch, 100)
    with pytest.raises(DeepWMLError, match="open in another program"):
        dicom_outline.write_outline_series(prepared, out / "P1_outline_dicom", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["P1_outline_dicom"] and len(list((out / "P1_outline_dicom").iterdir())) == 3


def test_change_case_names_windows_refuses(tmp_path, monkeypatch, capsys):
    # --case a:b wrote to drive A:'s folder (or a stream of the file "a"), not to OUTDIR
    monkeypatch.setattr(io, "WINDOWS", True, raising=False)
    base = ["change", str(tmp_path / "v1.nii.gz"), str(tmp_path / "v2.nii.gz"), "-o", str(tmp_path / "o")]
    for name in ("a:b", "p1?", "x|y"):
        assert main(base + ["--case", name]) == 2
        assert "Windows allows none of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_image_library_errors_on_a_non_ascii_path_say_why(tmp_path, monkeypatch):
    # SimpleITK opens files by a narrow name in Windows' code page: a path with "ü" failed with "cannot be read
    # as an image" (a scan), "folder without image files or a DICOM series" (a DICOM folder) or "cannot write".
    # Such files are now opened through an ASCII name (itk_names); where there is none (TEMP under C:\Users\Zoë,
    # on a volume without short names) the error says what to do
    monkeypatch.setattr(io, "WINDOWS", True, raising=False)
    monkeypatch.setattr(io, "_short_path", lambda path: None, raising=False)
    monkeypatch.delenv("SystemRoot", raising=False)
    (tmp_path / "Zoë").mkdir()
    monkeypatch.setattr(io.tempfile, "tempdir", str(tmp_path / "Zoë"))
    folder = tmp_path / "Müller"
    folder.mkdir()
    scan = folder / "flair.nrrd"
    scan.write_text("not an image\n", encoding="utf-8")
    with pytest.raises(DeepWMLError, match="letters outside ASCII"):
        io.read_image(scan)

    def refused(tmp):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: Could not create IO object")

    with pytest.raises(DeepWMLError, match="letters outside ASCII"):
        io.write_atomically(folder / "flair_wmh.nrrd", refused)
    from DeepWMLLib import segment

    dicom = folder / "DICOM"
    dicom.mkdir()
    with pytest.raises(DeepWMLError, match="without image files or a DICOM series; on Windows"):
        segment.segment_case("DICOM", dicom, tmp_path, models=[])
    import types

    import SimpleITK as sitk

    from DeepWMLLib import dicom_outline

    def no_io(self, image):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: Could not create IO object")

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", no_io)
    prepared = types.SimpleNamespace(images=[sitk.Image(4, 4, sitk.sitkUInt8)], series_uid="2.25.1", series_number=1)
    with pytest.raises(DeepWMLError, match="cannot write the outline series .*letters outside ASCII"):
        dicom_outline.write_outline_series(prepared, folder / "p1_outline_dicom")
    assert {p.name for p in folder.iterdir()} == {"flair.nrrd", "DICOM"}  # no temporary folder left
    monkeypatch.setenv("SystemRoot", str(tmp_path))  # Windows' own Temp (C:\Windows\Temp) takes the copy
    (tmp_path / "Temp").mkdir()
    with pytest.raises(DeepWMLError) as refusal:
        io.read_image(scan)
    assert "ASCII" not in str(refusal.value) and not os.listdir(tmp_path / "Temp")
    plain = tmp_path / "scan.nrrd"  # a plain path: the message as before
    plain.write_text("not an image\n", encoding="utf-8")
    with pytest.raises(DeepWMLError) as refusal:
        io.read_image(plain)
    assert "ASCII" not in str(refusal.value)


def test_ctrl_break_cleans_up_as_ctrl_c(monkeypatch, capsys):
    # Windows' Ctrl-Break (SIGBREAK; SIGUSR2 stands in for it here) ended the process at once: no clean-up of
    # temporary files and locks, no message
    import signal

    from DeepWMLLib import cli

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR2, raising=False)
    def run(args):  # the signal sent only when it is caught: left at its default it would end pytest
        if signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL:
            return 0
        os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(cli, "build_parser", lambda first: _Parser(run))
    assert cli.main(["segment"]) == 128 + signal.SIGUSR2
    assert "stopped by SIGUSR2" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # given back


class _Parser:
    def __init__(self, func):
        self.func = func

    def parse_known_args(self, argv):
        import argparse

        return argparse.Namespace(func=self.func, command="segment", debug=False), []


def test_a_path_past_windows_limit_says_so(tmp_path, monkeypatch):
    # past 260 characters (long paths off) Windows answers "No such file or directory" for a folder that exists
    monkeypatch.setattr(io, "WINDOWS", True, raising=False)

    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(io.tempfile, "mkstemp", missing)
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    with pytest.raises(DeepWMLError, match="limit of 260 characters"):
        io.write_text("{}", deep / "p1_report.json")
    with pytest.raises(DeepWMLError) as refusal:
        io.write_text("{}", tmp_path / "p1_report.json")
    assert "260" not in str(refusal.value)  # a short path: the message as before


def test_bench_launcher_runs_without_wait4(monkeypatch):
    # `deepwml bench` on Windows: the launcher process died on os.wait4 (none there), and the benchmark
    # stopped with "internal error: RuntimeError: the benchmark's launcher process stopped"
    import sys

    from DeepWMLLib import bench

    monkeypatch.setattr(bench, "_LAUNCHER", "import os\ndel os.wait4\n" + bench._LAUNCHER)
    launcher = bench._Launcher(dict(os.environ))
    try:
        seconds, peak = launcher.run([sys.executable, "-c", "pass"])
    finally:
        launcher.close()
    assert seconds > 0 and peak is None


    class Figures(dict):  # every other figure 1
        def __missing__(self, key):
            return 1

    figures = Figures(e_peak_rss_mb=None, model=["m.pt"], architecture={"base_channels": 8, "depth": 2},
                      gflop_per_slice_each=[1])
    assert "not measured on this system" in bench.format_table(figures)


def test_a_windows_gpu_is_found(tmp_path, monkeypatch):
    # CUDA was looked for only where Linux's NVIDIA driver shows (/proc/driver/nvidia): on Windows --device
    # auto ran on the CPU and --device cuda failed with "no CUDA GPU is usable here", the GPU unused
    import sys
    import types

    from DeepWMLLib import inference

    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(is_available=lambda: True)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.delenv("DEEPWML_PROBE_CUDA", raising=False)
    monkeypatch.setattr(inference.io, "WINDOWS", True)
    monkeypatch.setattr(inference.os.path, "exists", lambda p: str(p).endswith("nvcuda.dll"))  # no /proc here
    monkeypatch.setenv("SystemRoot", str(tmp_path))
    assert inference.resolve_device("auto") == "cuda"
    assert inference.resolve_device("cuda") == "cuda"
    monkeypatch.setattr(inference.os.path, "exists", lambda p: False)  # no NVIDIA driver: torch not asked
    torch.cuda.is_available = lambda: pytest.fail("torch asked without a driver")
    assert inference.resolve_device("auto") == "cpu"


def _windows_locks(monkeypatch):
    """No fcntl, and an msvcrt whose locking (as Windows': EACCES when another holder has the byte) is
    played by flock."""
    import errno
    import fcntl
    import sys
    import types

    def locking(fd, mode, nbytes):
        assert mode == msvcrt.LK_NBLCK and nbytes == 1
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None

    msvcrt = types.SimpleNamespace(LK_NBLCK=2, locking=locking)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl: ImportError, as on Windows
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)


def test_two_runs_on_one_case_are_kept_apart_on_windows(tmp_path, monkeypatch):
    # without fcntl nothing was locked: two runs writing one case of one OUTDIR (or two trainings in one
    # run folder) both went ahead, each writing over the other's files
    _windows_locks(monkeypatch)
    lock = tmp_path / ".p1.deepwml-lock"
    with io.exclusive(lock, "case 'p1'"):
        with pytest.raises(DeepWMLError, match="being written by another DeepWML process"):
            with io.exclusive(lock, "case 'p1'"):
                pass
    with io.exclusive(lock, "case 'p1'"):  # released
        pass
    assert not lock.exists()
    from DeepWMLLib import train

    run = tmp_path / "run"
    run.mkdir()
    train._lock_run_dir(run)
    try:
        other = open(run / ".lock", "w", encoding="utf-8")  # a second training's own open file
        try:
            assert io.try_lock(other.fileno()) is False
        finally:
            other.close()
    finally:
        train._unlock_run_dir(run)
    train._lock_run_dir(run)  # released: the next one gets it
    train._unlock_run_dir(run)


def test_a_run_folder_without_locks_is_not_called_busy(tmp_path, monkeypatch):
    # (Linux) a file system without locks (ENOLCK) made deepwml train say "another deepwml train is running"
    import errno

    fcntl = pytest.importorskip("fcntl")
    from DeepWMLLib import train

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    train._lock_run_dir(tmp_path)
    train._unlock_run_dir(tmp_path)


def test_the_model_cache_is_in_local_app_data_on_windows(tmp_path, monkeypatch):
    # it was ~/.cache/deepwml: a folder Windows does not know, carried with a roaming profile to a server
    from DeepWMLLib import checkpoint

    monkeypatch.setattr(checkpoint.io, "WINDOWS", True)  # the one flag the library reads
    for name in ("DEEPWML_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert checkpoint.cache_dir() == tmp_path / "Local" / "deepwml"
    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "mine"))  # still first
    assert checkpoint.cache_dir() == tmp_path / "mine"


def test_a_model_file_copied_over_another_is_hashed_anew(tmp_path, monkeypatch):
    # Windows: a model copied over the one a run uses (robocopy, shutil.copy2: the same file, its times copied)
    # keeps its creation time, which is st_ctime there; on a USB stick (FAT, exFAT) st_ino is 0 and times have
    # 2 s steps; models of one architecture have one size. The cache gave the old file's digest: the old
    # network's ONNX export and settings ran for the new model file
    import hashlib
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    from DeepWMLLib import checkpoint

    monkeypatch.setenv("DEEPWML_CACHE_DIR", str(tmp_path / "cache"))
    old, new, used = tmp_path / "old.pt", tmp_path / "new.pt", tmp_path / "stick" / "model.pt"
    old.write_bytes(b"weights of version 1" * 5000)
    new.write_bytes(b"weights of version 2" * 5000)
    os.utime(new, ns=(old.stat().st_atime_ns, old.stat().st_mtime_ns))
    real_stat = Path.stat

    def windows_stat(self, *args, **kwargs):  # st_ctime the creation time, st_ino 0 (FAT)
        found = real_stat(self, *args, **kwargs)
        if self != used:
            return found
        return SimpleNamespace(st_size=found.st_size, st_mtime_ns=found.st_mtime_ns, st_ino=0,
                               st_ctime_ns=1_700_000_000_000_000_000, st_mode=found.st_mode)

    monkeypatch.setattr(Path, "stat", windows_stat)
    used.parent.mkdir()
    shutil.copy2(old, used)
    assert checkpoint.file_digest(used) == hashlib.sha256(old.read_bytes()).hexdigest()[:24]
    shutil.copy2(new, used)
    assert checkpoint.file_digest(used) == hashlib.sha256(new.read_bytes()).hexdigest()[:24]
    assert checkpoint.file_digest(used) == hashlib.sha256(new.read_bytes()).hexdigest()[:24]  # remembered


def test_the_optimised_graph_is_kept_apart_for_cpus_of_one_name(monkeypatch):
    # ONNX Runtime's saved graph holds the convolution weights in blocks of the CPU's vector width (16 channels
    # with AVX-512, 8 with AVX2): without /proc/cpuinfo (Windows, macOS) it was keyed by the processor's name,
    # which a CPU with AVX-512 turned off (a virtual machine, the BIOS) shares, so a cache in a shared or
    # roaming home gave one workstation the other's graph, read wrongly without an error
    import builtins
    import platform

    from DeepWMLLib import inference

    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(platform, "processor", lambda: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel")
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # what numpy found on this CPU
    except ImportError:
        from numpy.core._multiarray_umath import __cpu_features__ as features
    keys = set()
    for avx512 in (True, False):
        monkeypatch.setitem(features, "AVX512F", avx512)
        keys.add(inference._machine_key("1.20.1"))
        assert inference._machine_key("1.20.1") in keys  # the same machine: the same key
    assert len(keys) == 2


def test_a_drives_recycle_bin_is_not_searched(tmp_path):
    # `deepwml segment E:\`: the scans deleted from a USB stick ($RECYCLE.BIN, readable to its owner) were cases
    import SimpleITK as sitk

    from conftest import make_volume, write_dicom_series

    image, _ = make_volume(size=(20, 16, 4), spacing=(0.8, 0.8, 5.0), dtype=sitk.sitkInt16)
    write_dicom_series(tmp_path / "P1", image, uid="1.2.3.4.1", description="t2_tirm_tra_dark-fluid")
    write_dicom_series(tmp_path / "$RECYCLE.BIN" / "S-1-5-21-1" / "$R0AB12C", image, uid="1.2.3.4.2",
                       description="t2_tirm_tra_dark-fluid")
    studies, problems = io.dicom_catalogue(tmp_path)
    assert [s.name for s in studies] == ["P1"] and not problems
    import shutil

    shutil.rmtree(tmp_path / "P1")
    assert not io.has_dicom_below(tmp_path)  # only the recycle bin holds DICOM


def test_a_manifest_from_excel_is_read_with_semicolons_and_refused_in_ansi_with_what_to_do(tmp_path):
    # Excel on Windows saves "CSV" in the ANSI code page (cp1252), and with ';' in many languages: the error
    # said "not a readable CSV file ('utf-8' codec can't decode...)" or "lacks column(s) case, ..."
    from DeepWMLLib.evaluation import read_manifest

    ansi = tmp_path / "ansi.csv"
    ansi.write_bytes("case,prediction,reference\nRené,a.nii.gz,b.nii.gz\n".encode("cp1252"))
    with pytest.raises(DeepWMLError, match="save it as UTF-8 CSV"):
        read_manifest(ansi, ("case", "prediction", "reference"))
    # 'CSV UTF-8' from Excel where the decimal separator is a comma (Germany, France...) separates columns by ';'
    # (the system's list separator), which the error told to replace by commas: a change of Windows' settings
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_bytes("\ufeffcase;prediction;reference\r\nMüller, H;\"a;1.nii.gz\";b,2.nii.gz\r\n".encode("utf-8"))
    (row,) = read_manifest(semicolons, ("case", "prediction", "reference"), path_columns=("prediction", "reference"))
    assert (row["case"], Path(row["prediction"]).name, Path(row["reference"]).name) == ("Müller, H", "a;1.nii.gz",
                                                                                      "b,2.nii.gz")
    assert Path(row["prediction"]).parent == tmp_path.resolve()
    # a column of the user's own whose quoted name holds a comma: the header's ';' still separate the columns
    semicolons.write_bytes('case;prediction;reference;"notes, free"\np1;a.nii.gz;b.nii.gz;x\n'.encode("utf-8"))
    (row,) = read_manifest(semicolons, ("case", "prediction", "reference"))
    assert (row["case"], row["notes, free"]) == ("p1", "x")


def test_tables_open_in_excel_with_their_letters(tmp_path):
    # Excel opens a CSV by a double-click in Windows' code page unless it starts with UTF-8's byte-order mark:
    # patient "Müller" showed as "MÃ¼ller" in summary.csv (and the evaluation's, training's, ... tables)
    import codecs

    from DeepWMLLib import evaluation, segment, train

    segment.write_summary([{"case": "Müller", "input": "C:\\Scans\\Müller", "status": "ok"}], tmp_path / "summary.csv")
    evaluation.write_csv([{"case": "Müller", "dice": 0.5}], ["case", "dice"], tmp_path / "per_case.csv")
    cases = [train.Case("Müller", "m.nii.gz", "m_mask.nii.gz"), train.Case("Zoë", "z.nii.gz", "z_mask.nii.gz")]
    train.write_split(tmp_path / "split.csv", cases, {"Müller": "train", "Zoë": "val"})
    for name in ("summary.csv", "per_case.csv", "split.csv"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(codecs.BOM_UTF8) and "Müller" in data.decode("utf-8-sig"), name
        assert data.count(codecs.BOM_UTF8) == 1
    # DeepWML's own readers take its tables with the mark, and those of older versions without it
    assert train.read_split(tmp_path / "split.csv", cases) == {"Müller": "train", "Zoë": "val"}
    (tmp_path / "old_split.csv").write_bytes((tmp_path / "split.csv").read_bytes()[len(codecs.BOM_UTF8):])
    assert train.read_split(tmp_path / "old_split.csv", cases) == {"Müller": "train", "Zoë": "val"}
    rows = evaluation.read_manifest(tmp_path / "per_case.csv", ("case", "dice"))
    assert [(r["case"], r["dice"]) for r in rows] == [("Müller", "0.5")]


_WINDOWS_RMTREE = """
import os, shutil, sys
from pathlib import Path

def rmtree(path, ignore_errors=False):  # as Windows: a file this process holds open is not removed
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            if os.path.realpath(os.path.join(root, name)) not in held:
                os.unlink(os.path.join(root, name))
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass

shutil.rmtree = rmtree
from DeepWMLLib import worker
sys.exit(worker.run(Path(sys.argv[1])))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to play Windows' rule")
def test_a_cancelled_worker_leaves_no_folder_on_windows(tmp_path):
    # Slicer's Cancel removes job.pkl and the worker then removes the folder, but the worker's stdout is
    # the folder's log.txt: on Windows that file, still open, stayed, and with it the folder (its owner
    # file gone, so no later sweep removed it either)
    import subprocess
    import sys

    folder = tmp_path / "deepwml-job-x"
    folder.mkdir()
    (folder / "owner").write_text(str(os.getpid()), encoding="utf-8")  # no job.pkl: the caller gave up
    with open(folder / "log.txt", "wb") as log:
        code = subprocess.run([sys.executable, "-c", _WINDOWS_RMTREE, str(folder)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(io.__file__)),
                              timeout=120).returncode
    assert code == 1
    assert not folder.exists()


def test_gpus_train_together_without_nccl(monkeypatch):
    # torchrun on a Windows computer with GPUs: PyTorch there has no NCCL, and deepwml train stopped with
    # "internal error: RuntimeError: Distributed package doesn't have NCCL built in"
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    from DeepWMLLib import train

    asked = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: asked.append(backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    train._start_distributed("cuda")
    assert asked == ["gloo"]


def _narrow_names(monkeypatch, tmp_path, short_names: bool) -> Path:
    """Windows with a code page that is not UTF-8, as SimpleITK meets it: every file name with letters outside
    ASCII fails, in ITK's own words (GDCM finds no series in such a folder). With `short_names`, Windows' 8.3
    names are played by ASCII links to each path asked for; without, the volume makes none. Returns the
    temporary folder (TEMP), which must be left empty."""
    import SimpleITK as sitk

    monkeypatch.setattr(io, "WINDOWS", True, raising=False)
    monkeypatch.delenv("SystemRoot", raising=False)
    temp = tmp_path / "Temp"
    temp.mkdir()
    monkeypatch.setattr(io.tempfile, "tempdir", str(temp))

    def refuse(name, what):
        if not str(name).isascii():
            raise RuntimeError(f"Exception thrown in SimpleITK {what}: D:\\a\\itk\\ITK\\Modules\\IO\\ImageBase\\src\\"
                               f"itkImageIOFactory.cxx:47:\nITK ERROR: Could not create IO object for file {name}")

    for cls, method in ((sitk.ImageFileReader, "ReadImageInformation"), (sitk.ImageFileReader, "Execute"),
                        (sitk.ImageFileWriter, "Execute")):
        def checked(self, *args, _real=getattr(cls, method), _what=f"{cls.__name__}_{method}"):
            refuse(self.GetFileName(), _what)
            return _real(self, *args)

        monkeypatch.setattr(cls, method, checked)
    real_series, real_ids, real_transform = (sitk.ImageSeriesReader.Execute, sitk.ImageSeriesReader.GetGDCMSeriesIDs,
                                             sitk.WriteTransform)

    def series(self):
        for name in self.GetFileNames():
            refuse(name, "ImageSeriesReader_Execute")
        return real_series(self)

    def transform(transform, name):
        refuse(name, "WriteTransform")
        return real_transform(transform, name)

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", series)
    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesIDs",
                        staticmethod(lambda folder, *args: real_ids(folder, *args) if str(folder).isascii() else ()))
    monkeypatch.setattr(sitk, "WriteTransform", transform)
    links = tmp_path / "short"
    links.mkdir()

    def short_path(path):
        if not os.path.exists(path):
            return None  # as Windows: only for what exists
        if str(path).isascii():
            return str(path)
        link = links / f"SHORT{len(os.listdir(links))}~1"
        link.symlink_to(os.path.abspath(path))
        return str(link)

    monkeypatch.setattr(io, "_short_path", short_path if short_names else lambda path: None, raising=False)
    return temp


def _scans_in(folder: Path):
    """A FLAIR as NIfTI (one under a name with letters outside ASCII), NRRD, MetaImage (.mhd + .zraw), a detached
    NRRD header (.nhdr + .raw.gz), NIfTI-1 pairs (.hdr + .img, one named with such letters) and a DICOM series, written into `folder` before SimpleITK is made to fail."""
    import SimpleITK as sitk

    from conftest import make_volume, write_dicom_series

    image, _ = make_volume(size=(24, 20, 5), spacing=(0.9, 0.8, 5.0), dtype=sitk.sitkInt16)
    folder.mkdir()
    files = [folder / name for name in ("flair.nii.gz", "Zoë_flair.nii.gz", "flair.nrrd", "flair.mhd", "flair.nhdr")]
    for path in files:
        sitk.WriteImage(image, str(path), True)
    assert {"flair.zraw", "flair.raw.gz"} <= set(os.listdir(folder))  # the .mhd's and .nhdr's data, in files of their own
    for name in ("flair.hdr", "Zoë_pair.hdr", "Zoë_zip.hdr.gz"):  # NIfTI-1 pairs: the .img (.img.gz) goes along
        sitk.WriteImage(image, str(folder / name))
        files.append(folder / name)
    dicom = write_dicom_series(folder / "Série_3", image, uid="1.2.3.4.7", description="AX T2 FLAIR")
    return image, files + [dicom]


@pytest.mark.parametrize("short_names", [True, False], ids=["short-names", "copies"])
def test_scans_in_a_folder_with_letters_outside_ascii_are_read(tmp_path, monkeypatch, short_names):
    # Windows, a code page that is not UTF-8: every scan under C:\Données or D:\Zoë failed ("cannot be read as an
    # image", or "a folder without image files or a DICOM series") with a hint to move the files
    import SimpleITK as sitk

    image, paths = _scans_in(tmp_path / "Données_Zoë")
    temp = _narrow_names(monkeypatch, tmp_path, short_names)
    for path in paths:
        read = io.read_any(path)
        assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image)), path.name
        assert io.grid_difference(read, image) is None, path.name
    assert io.is_dicom_folder(paths[-1])
    studies, problems = io.dicom_catalogue(tmp_path / "Données_Zoë")
    assert [s.name for s in studies] == ["Série_3"] and not problems
    assert io.read_time_axis(paths[2]) is None
    broken = tmp_path / "Données_Zoë" / "broken.nrrd"  # an unreadable scan there still says what is wrong with it
    broken.write_text("NRRD0004\ntype: float\n", encoding="utf-8")
    with pytest.raises(DeepWMLError, match="broken.nrrd cannot be read as an image"):
        io.read_any(broken)
    assert not os.listdir(temp)  # no copy left behind, also after the error
    assert bool(os.listdir(tmp_path / "short")) == short_names  # the short names were used where there were some
    monkeypatch.setattr(io, "_utf8_code_page", lambda: True)  # Windows set to UTF-8: SimpleITK gets the names as they are
    with io.itk_names(paths[1], paths[-1]) as names:
        assert names == [str(paths[1]), str(paths[-1])]


def test_copies_a_killed_run_left_in_temp_are_swept(tmp_path, monkeypatch):
    """A run killed outright (End task, a power cut) leaves its private copy of a scan in TEMP for good: the
    next copy made there first removes those untouched for over a day, and nothing else."""
    import SimpleITK as sitk

    image, paths = _scans_in(tmp_path / "Données_Zoë")
    temp = _narrow_names(monkeypatch, tmp_path, short_names=False)
    monkeypatch.setattr(io, "_swept", set(), raising=False)
    old = time.time() - 2 * 24 * 3600
    for name in ("deepwml-itk-left1", "deepwml-itk-recent", "mine-deepwml-itk-old", "other"):
        (temp / name / "0").mkdir(parents=True)
        (temp / name / "0" / "flair.nii.gz").write_bytes(b"a patient's scan")
    (temp / "deepwml-itk-a-file").write_bytes(b"not a folder")
    for name in ("deepwml-itk-left1", "mine-deepwml-itk-old", "other", "deepwml-itk-a-file"):
        os.utime(temp / name, (old, old))
    read = io.read_any(paths[1])  # a name with letters outside ASCII: copied to TEMP
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert sorted(os.listdir(temp)) == ["deepwml-itk-a-file", "deepwml-itk-recent", "mine-deepwml-itk-old", "other"]
    (temp / "deepwml-itk-left2").mkdir()
    os.utime(temp / "deepwml-itk-left2", (old, old))
    io.read_any(paths[1])
    assert (temp / "deepwml-itk-left2").is_dir()  # once per process: not a scan of TEMP for every file read


@pytest.mark.parametrize("short_names", [True, False], ids=["short-names", "copies"])
def test_segment_writes_into_a_folder_with_letters_outside_ascii(tmp_path, tiny_model, monkeypatch, short_names):
    # `deepwml segment ... -o D:\Résultats`: no mask, probability map or DICOM outline could be written there
    # ("cannot write ...; check free space and permissions"), nor for a case named after its patient (Zoë)
    import json

    import SimpleITK as sitk

    from conftest import make_volume, write_dicom_series

    image, _ = make_volume(size=(24, 20, 5), spacing=(0.9, 0.8, 5.0), dtype=sitk.sitkInt16)
    scans = tmp_path / "scans"  # read from plain paths but one: the writing is what is tried
    write_dicom_series(scans / "S4", image, uid="1.2.3.4.8", description="AX T2 FLAIR",
                       extra={"0010|0010": "Zoe^A", "0010|0020": "P4"})
    sitk.WriteImage(image, str(scans / "flair.nrrd"), True)
    (tmp_path / "Zoë").mkdir()
    zoe = tmp_path / "Zoë" / "Zoë.nrrd"  # a case named after its patient
    sitk.WriteImage(image, str(zoe), True)
    temp = _narrow_names(monkeypatch, tmp_path, short_names)
    out = tmp_path / "Résultats_Zoë"
    args = ["segment", str(scans / "flair.nrrd"), str(zoe), str(scans / "S4"), "-o", str(out), "--model",
            str(tiny_model), "--device", "cpu", "--save-probabilities", "--dicom-outline"]
    assert main(args) == 0
    for case in ("flair", "Zoë", "S4"):
        for suffix in ("_wmh.nrrd", "_prob.nrrd"):
            written = io.read_any(out / (case + suffix))
            assert io.grid_difference(written, image) is None, case + suffix
        assert json.loads((out / f"{case}_report.json").read_text(encoding="utf-8"))["case"] == case
    outline = out / "S4_outline_dicom"
    (series,) = io.dicom_series(outline)
    assert len(series.files) == len(os.listdir(outline)) == image.GetDepth() and series.secondary_capture
    assert not [p for p in out.iterdir() if p.name.startswith(".")] and not os.listdir(temp)


def test_a_transform_is_written_into_a_folder_with_letters_outside_ascii(tmp_path, monkeypatch):
    # `deepwml change` wrote none of its outputs into such a folder; its registration's transform is ITK's to write
    import SimpleITK as sitk

    from DeepWMLLib import change

    temp = _narrow_names(monkeypatch, tmp_path, short_names=False)
    folder = tmp_path / "Müller"
    folder.mkdir()
    path = folder / "p1_transform.tfm"
    transform = sitk.Euler3DTransform((0, 0, 0), 0.1, 0.0, 0.0, (1.0, 2.0, 3.0))
    io.write_atomically(path, lambda tmp: change._write_transform(transform, tmp))
    assert "Euler3DTransform" in path.read_text(encoding="utf-8")
    assert [p.name for p in folder.iterdir()] == ["p1_transform.tfm"] and not os.listdir(temp)


def test_windows_is_asked_for_short_names_and_its_code_page(monkeypatch):
    # the two calls itk_names makes of Windows (kernel32), played here: the short name's length, then the name
    import ctypes
    import types

    def short_name(path, buffer, size):
        name = {"C:\\Données": "C:\\DONNE~1", "D:\\Zoë": "D:\\Zoë"}.get(path)  # D: makes no short names
        if name is None:
            return 0  # no such file
        if buffer is None or size <= len(name):
            return len(name) + 1
        buffer.value = name
        return len(name)

    kernel32 = types.SimpleNamespace(GetShortPathNameW=short_name, GetACP=lambda: 1252)
    monkeypatch.setattr(ctypes, "windll", types.SimpleNamespace(kernel32=kernel32), raising=False)
    monkeypatch.setattr(io, "WINDOWS", True, raising=False)
    assert io._short_path("C:\\Données") == "C:\\DONNE~1"
    assert io._short_path("D:\\Zoë") == "D:\\Zoë" and io._short_path("E:\\none") is None
    assert io._narrow_name_fails("C:\\Données\\flair.nrrd") and not io._narrow_name_fails("C:\\data\\flair.nrrd")
    kernel32.GetACP = lambda: 65001  # Windows set to UTF-8
    assert not io._narrow_name_fails("C:\\Données\\flair.nrrd")


def test_the_workers_result_refused_for_a_moment_is_handed_back(tmp_path, monkeypatch):
    """The Slicer module's worker process hands back its result by a rename; a virus scanner holding the
    fresh file a moment made it fail on Windows (the segmentation lost, 'worker failed'). Tried again now."""
    from DeepWMLLib import worker

    calls = _refusing_replace(monkeypatch, 2)
    worker.write_whole(tmp_path / "result.pkl", b"mask")
    assert (tmp_path / "result.pkl").read_bytes() == b"mask" and len(calls) == 3
    assert not (tmp_path / "result.pkl.part").exists()


def test_an_export_another_process_holds_open_is_used(tmp_path, monkeypatch, tiny_model):
    """Two DeepWML runs that export one network to the model cache at once: on Windows the second cannot
    replace the first's file while that one is open, which stopped the run with a misleading 'the model
    cache cannot be written' warning and an export of its own. The first's copy is the same network: used."""
    from DeepWMLLib import inference
    from DeepWMLLib.checkpoint import load_model

    loaded = load_model(tiny_model)
    target = tmp_path / "cache" / "tiny.onnx"
    target.parent.mkdir()
    target.write_bytes(b"the other process's export")
    _refusing_replace(monkeypatch, 99)
    assert inference.OnnxRunner._export(loaded, target) == target
    assert target.read_bytes() == b"the other process's export"
    assert list(target.parent.iterdir()) == [target]  # no .part left behind


def test_a_detached_headers_data_file_above_it_is_copied_inside_the_private_folder(tmp_path, monkeypatch):
    """A .nhdr naming its voxels folders up ('data file: ../../v.raw'), read from a folder with letters outside
    ASCII by copy: two folders up, the voxel file was copied beside the private folder, into TEMP itself, and
    left there (a copy of a patient's scan, and a file of that name in TEMP overwritten)."""
    import SimpleITK as sitk

    folder = tmp_path / "Données" / "P1" / "hdr"
    folder.mkdir(parents=True)
    voxels = (np.arange(4 * 5 * 6) % 50).astype("<f4").reshape(4, 5, 6)
    (tmp_path / "Données" / "v.raw").write_bytes(voxels.tobytes())
    header = folder / "h.nhdr"
    header.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 6 5 4\nspacings: 0.9 0.9 5\nendian: little\n"
                       b"encoding: raw\ndata file: ../../v.raw\n")
    temp = _narrow_names(monkeypatch, tmp_path, short_names=False)
    read = io.read_any(header)
    assert np.array_equal(sitk.GetArrayFromImage(read), voxels)
    assert not os.listdir(temp)


def test_ensemble_members_of_one_file_name_are_named_apart_as_windows_finds_its_files(monkeypatch):
    """Members of one file name were named apart by their paths as typed: on Windows, where letter case does not
    tell files apart, one model file given twice (C:\\runs\\seed1\\best.pt, then c:\\Runs\\seed1\\best.pt) was
    named as two ('C:\\/runs/seed1/best.pt', 'c:\\/Runs/seed1/best.pt'), and members on two drives were named
    'D:\\/best.pt' and 'E:\\/best.pt'. One file keeps its name; others are named by '/'-joined parts."""
    from types import SimpleNamespace

    from DeepWMLLib import segment

    monkeypatch.setattr(segment, "Path", PureWindowsPath)
    monkeypatch.setattr(segment.os.path, "abspath", ntpath.abspath)
    monkeypatch.setattr(segment.os.path, "normcase", ntpath.normcase)

    def names(*paths):
        models = [SimpleNamespace(path=p, name=PureWindowsPath(p).name) for p in paths]
        segment.name_apart(models)
        return [m.name for m in models]

    assert names("C:\\runs\\seed1\\best.pt", "c:\\Runs\\seed1\\best.pt") == ["best.pt", "best.pt"]
    assert names("C:\\runs\\seed1\\best.pt", "C:/RUNS/Seed1/best.pt", "C:\\runs\\seed2\\best.pt") == \
        ["seed1/best.pt", "Seed1/best.pt", "seed2/best.pt"]
    assert names("C:\\a\\x\\best.pt", "C:\\b\\X\\best.pt") == ["a/x/best.pt", "b/X/best.pt"]  # not x and X
    assert names("D:\\best.pt", "E:\\best.pt") == ["D:/best.pt", "E:/best.pt"]
    assert names("\\\\server\\scans\\best.pt", "C:\\best.pt") == ["//server/scans/best.pt", "C:/best.pt"]
