"""How `deepwml change`'s registration behaves on real scans (no labels needed).

For every pair of the clinical FLAIRs in ../shared (two studies of one patient, and pairs of
different patients as a control): the registration's correlation and mutual information (the figures
the warning reads), its time, and its inverse consistency: a point carried follow-up -> baseline by
one registration and back by the registration run the other way round should land where it started
(median and 95th percentile over head voxels, mm). With --change, each same-patient pair is also run
through `lesion_change` with the shipped model's masks and the counts are printed. With --variations,
the same figures on what hospitals make of one patient's scans (`VARIATIONS`: one study re-sliced to 5 mm
axial slices, each averaging its slab; its intensities scaled and offset as by another scanner; the head
tilted 6 degrees more; all three at once) and on more pairs of different patients (`MORE_DIFFERENT`),
each pair with the checks it fails (corr, MI, both-ways; README, Lesion change).

    python Testing/benchmarks/change_pairs.py [--change [--grid-phases 4] [--change-only]] [--variations]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DeepWMLLib import change, io  # noqa: E402

SAME = [("patient01_study1", "patient01_study2"), ("patient03_study1", "patient03_study2"),
        ("patient12_study1", "patient12_study2"), ("patient19_study1", "patient19_study2")]
DIFFERENT = [("patient01_study1", "patient12_study2"), ("patient03_study1", "patient19_study2"),
             ("patient04_study1", "patient20_study2"), ("patient12_study1", "patient09_study2")]
# a study NAME[:thick5][:tilt6][:scale0.35+40] (see `variant`); all pairs of one patient
VARIATIONS = [("patient01_study1", "patient01_study2:thick5"), ("patient03_study1", "patient03_study2:thick5"),
              ("patient12_study1", "patient12_study2:thick5"), ("patient19_study1", "patient19_study2:thick5"),
              ("patient03_study1:thick5", "patient03_study2"), ("patient19_study1:thick5", "patient19_study2"),
              ("patient19_study1", "patient19_study2:scale3+20"), ("patient19_study1", "patient19_study2:tilt6"),
              ("patient03_study1", "patient03_study2:tilt6"), ("patient19_study1:thick5:tilt6", "patient19_study2"),
              ("patient19_study1", "patient19_study2:thick5:tilt6:scale0.35+40"),
              ("patient03_study1", "patient03_study2:thick5:tilt6:scale0.35+40"),
              ("patient03_study1:thick5:tilt6:scale0.35+40", "patient03_study2"),
              ("patient19_study1:thick5", "patient19_study2:thick5:tilt6")]
MORE_DIFFERENT = [("patient01_study1", "patient03_study2"), ("patient12_study1", "patient19_study2"),
                  ("patient04_study1", "patient09_study2"), ("patient19_study1", "patient03_study2:thick5"),
                  ("patient20_study2", "patient01_study2"), ("patient09_study2", "patient19_study1")]


def variant(image, thick_mm: float | None = None, tilt_deg: float = 0.0, scale: float = 1.0, offset: float = 0.0):
    """`image` as another acquisition of the same head: on axial slices `thick_mm` thick (each the average
    of five positions across its slab, the in-plane grid kept), the head nodded `tilt_deg` more about the
    image's first (left-right) axis through its centre, and its intensities times `scale` plus `offset`,
    rounded and kept within uint16 (another scanner's scale)."""
    import SimpleITK as sitk

    axis = io.axial_axis(image)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), float)
    new_spacing = spacing.copy()
    if thick_mm:
        new_spacing[axis] = thick_mm
    size = [int(np.ceil(n * s / t - 1e-6)) for n, s, t in zip(image.GetSize(), spacing, new_spacing)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(tuple(float(s) for s in new_spacing))
    grid.SetDirection(image.GetDirection())  # the same first slab edge as the original's
    grid.SetOrigin(tuple(np.array(image.GetOrigin()) + direction[:, axis] * (new_spacing[axis] - spacing[axis]) / 2))
    rotation = sitk.VersorRigid3DTransform()
    rotation.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    rotation.SetRotation(tuple(float(v) for v in direction[:, 0]), float(np.radians(tilt_deg)))
    source = sitk.Cast(image, sitk.sitkFloat32)
    fractions = (-0.4, -0.2, 0.0, 0.2, 0.4) if thick_mm else (0.0,)
    total = 0.0
    for fraction in fractions:
        step = sitk.TranslationTransform(3, tuple(float(v) for v in direction[:, axis] * fraction * new_spacing[axis]))
        total = total + sitk.GetArrayFromImage(sitk.Resample(source, grid, sitk.CompositeTransform([rotation, step]),
                                                             sitk.sitkLinear, 0.0))
    array = np.clip(np.round(total / len(fractions) * scale + offset), 0, 65535).astype(np.uint16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(grid)
    return out


def read(folder: Path, spec: str):
    """A study named NAME[:thick5][:tilt6][:scale0.35+40], made by `variant` when modified."""
    name, *modifiers = spec.split(":")
    image = io.read_image(folder / f"{name}.nii.gz")
    options = {}
    for modifier in modifiers:
        if modifier.startswith("thick"):
            options["thick_mm"] = float(modifier[len("thick"):])
        elif modifier.startswith("tilt"):
            options["tilt_deg"] = float(modifier[len("tilt"):])
        elif modifier.startswith("scale"):
            scale, offset = modifier[len("scale"):].split("+")
            options["scale"], options["offset"] = float(scale), float(offset)
        else:
            raise ValueError(f"unknown modifier {modifier!r} in {spec!r}")
    return variant(image, **options) if options else image


def inverse_consistency(forward, backward, image, every: int = 997) -> tuple[float, float]:
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    index = np.argwhere(change._head_values(np.asarray(array, float)))[::every]
    errors = []
    for k, j, i in index:
        point = image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        back = backward.transform.TransformPoint(forward.transform.TransformPoint(point))
        errors.append(float(np.linalg.norm(np.subtract(back, point))))
    return float(np.median(errors)), float(np.percentile(errors, 95))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--change", action="store_true", help="also segment each same-patient pair and count changes")
    parser.add_argument("--grid-phases", type=int, default=1, choices=(1, 4),
                        help="with --change, segment with deepwml segment's --grid-phases")
    parser.add_argument("--change-only", action="store_true",
                        help="with --change, only the change counts (not the registration table before them)")
    parser.add_argument("--variations", action="store_true",
                        help="also re-sliced, rescaled and tilted same-patient pairs, and more different-patient ones")
    args = parser.parse_args()
    root = io.shared_data_dir()
    if root is None:
        print("../shared/data is absent", file=sys.stderr)
        return 1
    folder = root / "open_ms" / "clinical_flair"
    groups = ((SAME, True), (DIFFERENT, False)) + (((VARIATIONS, True), (MORE_DIFFERENT, False)) if args.variations else ())
    if args.change and args.change_only:
        groups = ()
    else:
        print("| pair | same patient | correlation | mutual information | seconds | inverse consistency median / p95 mm "
              "| checks failed |")
        print("|---|---|---|---|---|---|---|")
    for pairs, same in groups:
        for base_name, follow_name in pairs:
            baseline, followup = (read(folder, n) for n in (base_name, follow_name))
            forward = change.align(followup, baseline)
            backward = change.align(baseline, followup)
            median, p95 = inverse_consistency(forward, backward, followup)
            failed = [name for name, fails in (("corr", not forward.correlation >= change.MIN_CORRELATION),
                                               ("MI", forward.mutual_information > change.MAX_MUTUAL_INFORMATION),
                                               ("both-ways", not p95 <= change.MAX_INCONSISTENCY_MM)) if fails]
            print(f"| {base_name} -> {follow_name} | {'yes' if same else 'no'} | {forward.correlation:.3f} | "
                  f"{forward.mutual_information:.3f} | {forward.seconds:.1f} | {median:.2f} / {p95:.2f} | "
                  f"{', '.join(failed) or 'none'} |", flush=True)
    if args.change:
        from DeepWMLLib.segment import segment_image

        print("\n| pair | baseline ml | follow-up ml | new | enlarging | stable | gone | small new / gone | seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        for base_name, follow_name in SAME:
            baseline, followup = (io.read_image(folder / f"{n}.nii.gz") for n in (base_name, follow_name))
            start = time.perf_counter()
            base, follow = (segment_image(image, grid_phases=args.grid_phases) for image in (baseline, followup))
            report = change.lesion_change(baseline, followup, base.mask, follow.mask,
                                          baseline_probabilities=base.probabilities,
                                          followup_probabilities=follow.probabilities,
                                          presence=change.DEFAULT_PRESENCE).report  # as deepwml change does
            print(f"| {base_name} -> {follow_name} | {report['baseline_volume_ml']:.2f} | {report['followup_volume_ml']:.2f} "
                  f"| {report['n_new']} ({report['new_ml']:.2f} ml) | {report['n_enlarging']} "
                  f"(+{report['enlarging_growth_ml']:.2f} ml) | {report['n_stable']} | {report['n_gone']} "
                  f"({report['gone_ml']:.2f} ml) | {report['n_small_new']} / {report['n_small_gone']} | "
                  f"{time.perf_counter() - start:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
