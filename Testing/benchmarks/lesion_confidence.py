"""Does a lesion's mean probability (the report's `mean_probability`) tell the real lesions from the
false marks? Measured on the real labelled MS cases, which nothing was tuned on.

    python Testing/benchmarks/lesion_confidence.py [--thickness 1 5 8] [--model FILE ...] [--json OUT]

Each case is segmented as `deepwml segment` does (the default ensemble and brain mask; thick slices as
in labelled_cases.py, slabs from the first 1 mm slice). Every marked lesion of the report (a 3D
26-connected component) counts as a true lesion when it overlaps the consensus reference by at least
one voxel (the challenge's lesion-wise rule), else as a false mark. The lesions are grouped by their
mean probability in bands fixed before anything was measured: 0.5-0.6, 0.6-0.7, 0.7-0.8, 0.8-0.9,
0.9-1. Per band: lesions, the share of them that are true (lesion-wise precision), and the share of
the marked volume in them that lies in true lesions. It takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing" / "benchmarks"))

from labelled_cases import CASES, load_case  # noqa: E402

from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.postprocessing import label_components  # noqa: E402

BANDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)


def lesions_of(case_image, reference, models, brain) -> list[dict]:
    """(mean probability, voxels, true or not) of every marked lesion, in the report's order."""
    from DeepWMLLib.segment import segment_image

    result = segment_image(case_image, models, device="cpu", brain_model=brain)
    labels, count = label_components(sitk.GetArrayFromImage(result.mask) > 0)
    truth = sitk.GetArrayViewFromImage(reference) > 0
    hit = np.zeros(count + 1, bool)
    hit[np.unique(labels[truth & (labels > 0)])] = True
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # the report orders lesions by size (largest first), as this does; its mean probability is the one
    # compared, and a lesion is matched to its component by its voxel count and rank
    order = np.argsort(-sizes[1:], kind="stable") + 1
    rows = []
    for lesion, component in zip(result.report["lesions"], order):
        assert lesion["voxels"] == sizes[component]
        rows.append({"mean_probability": lesion["mean_probability"], "voxels": int(sizes[component]),
                     "ml": lesion["volume_ml"], "true": bool(hit[component])})
    return rows


def band_table(lesions: list[dict]) -> list[dict]:
    table = []
    for low, high in zip(BANDS[:-1], BANDS[1:]):
        inside = [x for x in lesions if low <= x["mean_probability"] < high]
        ml = sum(x["ml"] for x in inside)
        table.append({"band": f"{low:.1f}-{min(high, 1.0):.1f}", "lesions": len(inside),
                      "true_share": round(sum(x["true"] for x in inside) / len(inside), 3) if inside else None,
                      "ml": round(ml, 3),
                      "true_volume_share": round(sum(x["ml"] for x in inside if x["true"]) / ml, 3) if ml else None})
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thickness", nargs="+", type=int, default=[1, 5, 8])
    parser.add_argument("--model", nargs="+")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from DeepWMLLib.segment import load_brain_model, load_models

    shared = io.shared_data_dir()
    if shared is None:
        raise SystemExit("../shared/data is absent: the labelled cases are needed")
    root = shared / "open_ms" / "labelled"
    models, brain = load_models(args.model), load_brain_model("default")
    results = {}
    for thickness in args.thickness:
        pooled = []
        for case in CASES:
            flair, reference = load_case(root, case, thickness)
            found = lesions_of(flair, reference, models, brain)
            print(f"{case} {thickness} mm: {len(found)} lesions, {sum(x['true'] for x in found)} true", flush=True)
            pooled += [{**x, "case": case} for x in found]
        results[thickness] = {"lesions": pooled, "bands": band_table(pooled)}
        print(f"\n{thickness} mm, the three cases pooled")
        print("| mean probability | lesions | true share | marked ml | true volume share |")
        print("| --- | --- | --- | --- | --- |")
        for row in results[thickness]["bands"]:
            print(f"| {row['band']} | {row['lesions']} | {row['true_share']} | {row['ml']} | {row['true_volume_share']} |")
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
