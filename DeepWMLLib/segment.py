"""The main job: FLAIR volume in, WMH mask on the input's exact grid plus a lesion report out.

`segment_image` is the Python API (the Slicer module and batch scripts call it); `segment_cases`
runs a list of files and folders the way `deepwml segment` does; `register` adds the sub-command.
"""

from __future__ import annotations

import argparse
import csv
import io as _stringio
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import io
from .errors import DeepWMLError

if TYPE_CHECKING:
    import SimpleITK as sitk

MODELS_DIR_ENV = "DEEPWML_MODELS_DIR"
SUMMARY_COLUMNS = ("case", "input", "volume_ml", "lesion_count", "status", "error", "seconds")


def models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "Resources" / "Models"


def shipped_models() -> list[dict]:
    """The model registry (Resources/Models/models.json): name, file, version, description, default."""
    registry = models_dir() / "models.json"
    if not registry.is_file():
        raise DeepWMLError(f"no model registry at {registry}; pass --model FILE or set {MODELS_DIR_ENV}")
    entries = json.loads(registry.read_text())["models"]
    for entry in entries:
        entry["path"] = str(models_dir() / entry["file"])
    return entries


def default_model_paths() -> list[str]:
    entries = shipped_models()
    default = [e for e in entries if e.get("default")] or entries[:1]
    return [e["path"] for e in default]


def load_models(paths: Sequence[str | os.PathLike] | None = None) -> list:
    """Model files' settings (None: the shipped default model); each network is built on first use."""
    from .checkpoint import load_model_settings

    return [load_model_settings(p) for p in (paths or default_model_paths())]


@dataclass
class SegmentationResult:
    mask: sitk.Image  # uint8 0/1 on the input grid
    probabilities: sitk.Image  # float32 0–1 on the input grid
    report: dict


def segment_image(image: sitk.Image, models: Sequence | None = None, device: str = "auto",
                  threshold: float | None = None, tta: bool = False, min_lesion_mm3: float | None = None,
                  exclude_edge_fraction: float = 0.0, batch_size: int | None = None,
                  progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
                  backend: str = "auto") -> SegmentationResult:
    """Segment WMH in a 3D FLAIR image; the mask and probabilities share the input's grid exactly."""
    from .inference import predict_probabilities, resolve_device
    from .postprocessing import DEFAULT_MIN_LESION_MM3, postprocess
    from .report import lesion_report

    start = time.perf_counter()
    io.check_volume(image)
    models = list(models) if models else load_models()
    if threshold is None:
        threshold = float(np.mean([m.threshold for m in models]))
    if not 0 < threshold < 1:
        raise DeepWMLError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
    dev = resolve_device(device)
    probabilities, frame = predict_probabilities(image, models, dev, batch_size, tta, progress, cancel, backend)
    mask_stack = postprocess(probabilities, threshold, float(np.prod(frame.spacing)),
                             DEFAULT_MIN_LESION_MM3 if min_lesion_mm3 is None else min_lesion_mm3,
                             exclude_edge_fraction)
    mask = io.from_axial_stack(mask_stack, frame)
    prob_image = io.from_axial_stack(probabilities, frame)
    report = lesion_report(mask)
    plane = io.acquisition_plane(image)
    report.update({
        "acquisition_plane": plane,
        "warnings": [] if plane == "axial" else [
            f"{plane} acquisition: DeepWML segmented the axial planes of the volume; accuracy was only validated on axial acquisitions"
        ],
        "model": [m.name for m in models],
        "threshold": threshold,
        "tta": bool(tta),
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 3),
    })
    return SegmentationResult(mask, prob_image, report)


# ---------------------------------------------------------------------------------------------
# Batch of cases (the CLI)


def expand_inputs(inputs: Sequence[str]) -> list[tuple[str, Path]]:
    """(case name, path) for each image file, DICOM folder, or image file inside a plain folder."""
    cases = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir() and not io.is_dicom_folder(path):
            members = sorted(p for p in path.iterdir() if (p.is_file() and io.is_image_file(p)) or io.is_dicom_folder(p))
            if not members:
                cases.append((io.case_name(path), path))  # reported as an error for that input
            cases.extend((io.case_name(p), p) for p in members)
        else:
            cases.append((io.case_name(path), path))
    return cases


def output_paths(out_dir: Path, case: str, save_probabilities: bool) -> dict:
    paths = {
        "mask": out_dir / f"{case}_wmh.nii.gz",
        "segmentation": out_dir / f"{case}.seg.nrrd",
        "report": out_dir / f"{case}_report.json",
    }
    if save_probabilities:
        paths["probabilities"] = out_dir / f"{case}_prob.nii.gz"
    return paths


def segment_case(case: str, path: Path, out_dir: Path, models: Sequence, device: str = "auto",
                 threshold: float | None = None, tta: bool = False, save_probabilities: bool = False,
                 overwrite: bool = False, min_lesion_mm3: float | None = None, exclude_edge_fraction: float = 0.0,
                 batch_size: int | None = None, backend: str = "auto", progress=None, cancel=None) -> dict:
    """Segment one case and write its outputs; returns its summary row (status ok/skipped)."""
    paths = output_paths(out_dir, case, save_probabilities)
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        return {"case": case, "input": str(path), "status": "skipped",
                "error": f"outputs exist ({', '.join(existing)}); use --overwrite to replace them"}
    if path.is_dir() and not io.is_dicom_folder(path):
        raise DeepWMLError(f"{path} is a folder without image files or a DICOM series")
    image = io.read_image(path, light=True)  # a plain NIfTI file: no SimpleITK import
    result = segment_image(image, models, device, threshold, tta, min_lesion_mm3, exclude_edge_fraction,
                           batch_size, progress, cancel, backend)
    report = {"case": case, "input": str(path), **result.report}
    io.write_image(result.mask, paths["mask"])
    io.write_segmentation(result.mask, paths["segmentation"])
    if save_probabilities:
        io.write_image(result.probabilities, paths["probabilities"])
    io.write_text(json.dumps(report, indent=1), paths["report"])
    return {"case": case, "input": str(path), "volume_ml": report["volume_ml"],
            "lesion_count": report["lesion_count"], "status": "ok", "error": "", "seconds": report["seconds"],
            "warnings": report["warnings"]}


def segment_cases(inputs: Sequence[str], out_dir: str | os.PathLike, model_paths: Sequence[str] | None = None,
                  device: str = "auto", progress_factory=None, debug: bool = False, **options) -> list[dict]:
    """Run every case; a failing case is recorded (status error) and the others still run."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepWMLError(f"cannot create output folder {out} ({exc.strerror})") from exc
    if not os.access(out, os.W_OK):
        raise DeepWMLError(f"output folder {out} is not writable; choose another with -o")
    models = load_models(model_paths)
    cases = expand_inputs(inputs)
    rows, seen = [], set()
    for number, (case, path) in enumerate(cases, start=1):
        progress = progress_factory(number, len(cases), case) if progress_factory else None
        start = time.perf_counter()
        try:
            if case in seen:
                raise DeepWMLError(f"two inputs are both named {case!r}; rename one so their outputs do not collide")
            seen.add(case)
            row = segment_case(case, path, out, models, device, progress=progress, **options)
        except Exception as exc:  # one bad case never stops the others
            if debug:
                traceback.print_exc()
            message = str(exc) if isinstance(exc, DeepWMLError) else f"internal error: {type(exc).__name__}: {exc}"
            row = {"case": case, "input": str(path), "status": "error", "error": message,
                   "seconds": round(time.perf_counter() - start, 3)}
        rows.append(row)
        if progress_factory:
            progress_factory.finish(row)
    write_summary(rows, out / "summary.csv")
    return rows


def write_summary(rows: Sequence[dict], path: Path) -> None:
    buffer = _stringio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    io.write_text(buffer.getvalue(), path)


class ProgressBar:
    """A one-line progress bar on stderr per case (plain lines when stderr is not a terminal)."""

    def __init__(self, stream=None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()

    def __call__(self, number: int, total: int, case: str):
        prefix = f"[{number}/{total}] {case}"
        last = [-1]

        def update(fraction: float, message: str) -> None:
            if self.tty:
                filled = int(self.width * fraction)
                self.stream.write(f"\r{prefix} |{'#' * filled}{'.' * (self.width - filled)}| {fraction:4.0%} {message[:40]:<40}")
                self.stream.flush()
            elif int(fraction * 4) > last[0]:  # quarter steps keep logs short
                last[0] = int(fraction * 4)
                self.stream.write(f"{prefix}: {fraction:4.0%} {message}\n")

        return update

    def finish(self, row: dict) -> None:
        if self.tty:
            self.stream.write("\r" + " " * (self.width + 100) + "\r")
        status = row["status"]
        detail = f"{row.get('volume_ml', 0):.2f} ml, {row.get('lesion_count', 0)} lesions, {row.get('seconds', 0):.1f} s" \
            if status == "ok" else row.get("error", "")
        self.stream.write(f"{row['case']}: {status} - {detail}\n")
        for warning in row.get("warnings", []):
            self.stream.write(f"{row['case']}: warning: {warning}\n")
        self.stream.flush()


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError("must be in [0, 0.5)")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def register(subparsers) -> None:
    from .cli import add_debug_flag

    p = subparsers.add_parser(
        "segment", help="segment WMH in FLAIR volumes",
        description="Segment white matter hyperintensities. INPUT: an image file (.nii, .nii.gz, .nrrd, .mha, .mhd), "
                    "a DICOM series folder, or a folder of image files (each a case).")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR")
    p.add_argument("--model", nargs="+", metavar="FILE", help="model file(s); several = ensemble (probabilities averaged). "
                   "Default: the shipped default model")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threshold", type=_probability, help="probability threshold (default: from the model file)")
    p.add_argument("--tta", action="store_true", help="average with a left-right flipped prediction")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE_prob.nii.gz")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them, skip the case)")
    p.add_argument("--min-lesion-mm3", type=float, default=None,
                   help="remove 3D lesions smaller than this (default 5 mm³; 0 keeps all)")
    p.add_argument("--exclude-edge-slices", type=_fraction, default=0.0, metavar="FRACTION",
                   help="clear detections in the first/last FRACTION of axial slices (default 0: off)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per network batch")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"),
                   help="auto: ONNX Runtime on the CPU when installed, else PyTorch")
    add_debug_flag(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    rows = segment_cases(
        args.inputs, args.output_dir, args.model, args.device, progress_factory=ProgressBar(), debug=args.debug,
        threshold=args.threshold, tta=args.tta, save_probabilities=args.save_probabilities,
        overwrite=args.overwrite, min_lesion_mm3=args.min_lesion_mm3,
        exclude_edge_fraction=args.exclude_edge_slices, batch_size=args.batch_size, backend=args.backend)
    failed = sum(r["status"] == "error" for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} cases done, summary in {Path(args.output_dir) / 'summary.csv'}", file=sys.stderr)
    return 1 if failed else 0
