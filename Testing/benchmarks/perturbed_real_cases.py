"""Metrics of perturbed real masks, and the cohort reports produced from them.

    python Testing/benchmarks/perturbed_real_cases.py OUTDIR

Takes the three labelled Ljubljana MS cases (../shared/data/open_ms/labelled/patientNN, 3-rater
consensus masks, 1 mm MNI grid) and writes, for each, perturbed copies of the consensus mask whose
effect on the metrics is predictable:

    eroded          in-plane erosion by one voxel (a rater drawing tighter outlines)
    dilated         in-plane dilation by one voxel (looser outlines)
    shifted_x1      moved 1 voxel along the first voxel axis
    shifted_y2      moved 2 voxels along the second voxel axis
    lesion_removed  one 26-connected lesion deleted (a missed lesion): the largest lesion that holds
                    less than 10 % of the lesion load, so a confluent lesion is not the one removed

plus a probability map for each (the perturbed mask smoothed with a 1 mm Gaussian) for ROC AUC.
Then it runs

    deepwml evaluate  --manifest OUTDIR/cases.csv  -o OUTDIR/evaluation    (report: evaluation/report.md)
    deepwml consensus --manifest OUTDIR/raters.csv -o OUTDIR/consensus     (consensus/consensus.csv)

In cases.csv the `disease` column holds the perturbation and `centre` the patient, so that the
paper's per-disease/per-centre tables and tests compare perturbations and patients. These are not
diseases or centres; the report is a check of the evaluation machinery on real lesion shapes,
not a measure of any model.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.cli import main  # noqa: E402

PATIENTS = ("patient07", "patient19", "patient26")


def in_plane_cross(image: sitk.Image) -> np.ndarray:
    """4-connected cross in the axial plane of `image`, as a numpy (k, j, i) structuring element."""
    plane = ndimage.generate_binary_structure(2, 1)
    return np.expand_dims(plane, axis=2 - io.axial_axis(image))


def shifted(mask: np.ndarray, axis: int, voxels: int) -> np.ndarray:
    out = np.zeros_like(mask)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(0, mask.shape[axis] - voxels), slice(voxels, None)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def perturbations(reference: sitk.Image) -> dict[str, np.ndarray]:
    """The perturbed copies of a binary reference mask, as (k, j, i) uint8 arrays on its grid."""
    mask = sitk.GetArrayFromImage(reference) > 0
    cross = in_plane_cross(reference)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    candidates = np.flatnonzero(sizes < 0.1 * sizes.sum())
    if candidates.size == 0:  # one or a few lesions only: any of them will do
        candidates = np.arange(sizes.size)
    removed = candidates[np.argmax(sizes[candidates])] + 1
    result = {
        "eroded": ndimage.binary_erosion(mask, structure=cross),
        "dilated": ndimage.binary_dilation(mask, structure=cross),
        "shifted_x1": shifted(mask, axis=2, voxels=1),   # numpy axis 2 = voxel axis i
        "shifted_y2": shifted(mask, axis=1, voxels=2),   # numpy axis 1 = voxel axis j
        "lesion_removed": mask & (labels != removed),
    }
    return {name: array.astype(np.uint8) for name, array in result.items()}


def on_grid(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def write_cohort(data_root: Path, out: Path, patients=PATIENTS, probabilities: bool = True) -> tuple[Path, Path]:
    """Write the perturbed masks and the two manifests; return (cases.csv, raters.csv)."""
    masks = out / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    case_rows, rater_rows = [], []
    for patient in patients:
        source = data_root / "open_ms" / "labelled" / patient / "consensus_mask.nii.gz"
        reference = io.read_mask(source)
        for name, array in perturbations(reference).items():
            case = f"{patient}_{name}"
            io.write_image(on_grid(array, reference), masks / f"{case}.nii.gz")
            row = [case, f"masks/{case}.nii.gz", str(source), patient, name]
            if probabilities:
                smooth = sitk.SmoothingRecursiveGaussian(on_grid(array.astype(np.float32), reference), 1.0)
                io.write_image(sitk.Cast(smooth, sitk.sitkFloat32), masks / f"{case}_prob.nii.gz")
                row.append(f"masks/{case}_prob.nii.gz")
            case_rows.append(row)
            rater_rows.append([case, f"masks/{case}.nii.gz", str(source)])
    header = ["case", "prediction", "reference", "centre", "disease"] + (["probabilities"] if probabilities else [])
    cases, raters = out / "cases.csv", out / "raters.csv"
    for path, head, rows in ((cases, header, case_rows), (raters, ["case", "rater_a", "rater_b"], rater_rows)):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(head)
            writer.writerows(rows)
    return cases, raters


def run(out: Path) -> int:
    root = io.shared_data_dir()
    if root is None or not (root / "open_ms" / "labelled").is_dir():
        print("../shared/data/open_ms/labelled (or DEEPWML_SHARED_DATA) is absent: nothing to run", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cases, raters = write_cohort(root, out)
    print(f"perturbed masks written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    status = main(["evaluate", "--manifest", str(cases), "-o", str(out / "evaluation")])
    n_cases = sum(1 for _ in open(cases)) - 1
    print(f"evaluate: {n_cases} cases in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    status |= main(["consensus", "--manifest", str(raters), "-o", str(out / "consensus")])
    print(f"consensus: {n_cases} pairs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(run(Path(sys.argv[1])))
