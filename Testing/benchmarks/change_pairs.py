"""How `deepwml change`'s registration behaves on real scans (no labels needed).

For every pair of the clinical FLAIRs in ../shared (two studies of one patient, and pairs of
different patients as a control): the registration's correlation and mutual information (the figures
the warning reads), its time, and its inverse consistency: a point carried follow-up -> baseline by
one registration and back by the registration run the other way round should land where it started
(median and 95th percentile over head voxels, mm). With --change, each same-patient pair is also run
through `lesion_change` with the shipped model's masks and the counts are printed.

    python Testing/benchmarks/change_pairs.py [--change]
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
    args = parser.parse_args()
    root = io.shared_data_dir()
    if root is None:
        print("../shared/data is absent", file=sys.stderr)
        return 1
    folder = root / "open_ms" / "clinical_flair"
    print("| pair | same patient | correlation | mutual information | seconds | inverse consistency median / p95 mm |")
    print("|---|---|---|---|---|---|")
    for pairs, same in ((SAME, True), (DIFFERENT, False)):
        for base_name, follow_name in pairs:
            baseline, followup = (io.read_image(folder / f"{n}.nii.gz") for n in (base_name, follow_name))
            forward = change.align(followup, baseline)
            backward = change.align(baseline, followup)
            median, p95 = inverse_consistency(forward, backward, followup)
            print(f"| {base_name} -> {follow_name} | {'yes' if same else 'no'} | {forward.correlation:.3f} | "
                  f"{forward.mutual_information:.3f} | {forward.seconds:.1f} | {median:.2f} / {p95:.2f} |")
    if args.change:
        from DeepWMLLib.segment import segment_image

        print("\n| pair | baseline ml | follow-up ml | new | enlarging | stable | gone | small new / gone | seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        for base_name, follow_name in SAME:
            baseline, followup = (io.read_image(folder / f"{n}.nii.gz") for n in (base_name, follow_name))
            start = time.perf_counter()
            base, follow = (segment_image(image) for image in (baseline, followup))
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
