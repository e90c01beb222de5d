"""How well the ventricle network finds the lateral ventricles, and how far the periventricular/deep split
it gives can be trusted (the checks behind its model card).

    python Testing/benchmarks/ventricle_check.py [--ventricle-model FILE] [--synthetic MANIFEST SPLIT]
        [--pictures DIR] [--json OUT]

1. --synthetic: Dice of the ventricle mask (as `deepwml segment` makes it: the network, the brain mask,
   small components dropped) against the synthetic ventricle masks of the split's test cases
   (`deepwml synth --ventricles` data; the WMH model here is one member, it does not enter the mask).
2. The three labelled cases (../shared/data/open_ms/labelled, MNI space, skull-stripped), at 1 mm and
   re-sliced to 5 mm: the periventricular volume of the *reference* lesion mask measured from the
   network's ventricles and from the MNI atlas's lateral ventricles (templates/mni152_tissue_labels,
   label 4, resampled onto the case by physical coordinates), the difference as a share of the case's
   reference lesion volume, and the Dice of the two ventricle masks. The atlas is an average brain, so
   this is a check of gross errors, not a measure of accuracy on these brains.
3. The 11 unlabelled clinical FLAIRs: the ventricle volume and the split of DeepWML's own marks;
   with --pictures, each scan's QC picture with the ventricles outlined in blue, to look at.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "Testing" / "benchmarks"))

from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.io import shared_data_dir  # noqa: E402
from DeepWMLLib.location import PERIVENTRICULAR_MM, ventricle_distance  # noqa: E402
from DeepWMLLib.segment import VENTRICLE_ROLE, default_model_paths, load_models, segment_image, shipped_models  # noqa: E402
from labelled_cases import CASES, load_case, thick_slices  # noqa: E402

ATLAS_VENTRICLE_LABEL = 4


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def stack(image: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    array, frame = io.to_axial_stack(image, dtype=np.uint8)
    return array > 0, (frame.slice_thickness_mm, frame.row_spacing_mm, frame.col_spacing_mm)


def synthetic(manifest: Path, split: Path, models, ventricle_model) -> list[dict]:
    chosen = {row["case"] for row in csv.DictReader(open(split, encoding="utf-8-sig")) if row["split"] == "test"}
    rows = []
    for row in csv.DictReader(open(manifest, encoding="utf-8-sig")):
        if row["case"] not in chosen:
            continue
        image = io.read_image(manifest.parent / row["flair"])
        truth = io.read_mask(manifest.parent / row["ventricles"], reference=image)
        result = segment_image(image, models[:1], device="cpu", ventricle_model=ventricle_model)
        found, _ = stack(result.ventricles)
        expected, spacing = stack(truth)
        rows.append({"case": row["case"], "dice": round(dice(found, expected), 4),
                     "ml": round(float(found.sum() * np.prod(spacing) / 1000), 2),
                     "reference_ml": round(float(expected.sum() * np.prod(spacing) / 1000), 2),
                     "thickness_mm": round(spacing[0], 2), "skull": row.get("skull")})
        print(f"synthetic {row['case']}: Dice {rows[-1]['dice']:.3f}, {rows[-1]['ml']} ml of {rows[-1]['reference_ml']}",
              flush=True)
    return rows


def periventricular_ml(lesion: np.ndarray, ventricles: np.ndarray, spacing) -> float:
    distance = ventricle_distance(ventricles, spacing)
    return float((lesion & (distance <= PERIVENTRICULAR_MM)).sum() * np.prod(spacing) / 1000)


def labelled(root: Path, atlas_path: Path, models, ventricle_model) -> list[dict]:
    atlas = sitk.ReadImage(str(atlas_path), sitk.sitkUInt8)
    rows = []
    for case in CASES:
        one_mm, _ = load_case(root, case, 1)
        resampled = sitk.Resample(atlas, one_mm, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        atlas_ventricles = sitk.Cast(resampled == ATLAS_VENTRICLE_LABEL, sitk.sitkUInt8)
        for thickness in (1, 5):
            flair, reference = load_case(root, case, thickness)
            result = segment_image(flair, models, device="cpu", ventricle_model=ventricle_model)
            found, spacing = stack(result.ventricles)
            atlas_on_case = thick_slices(atlas_ventricles, thickness, mask=True)  # slabbed like the case
            expected, _ = stack(atlas_on_case)
            lesion, _ = stack(reference)
            total = float(lesion.sum() * np.prod(spacing) / 1000)
            by_net, by_atlas = periventricular_ml(lesion, found, spacing), periventricular_ml(lesion, expected, spacing)
            rows.append({"case": case, "thickness_mm": thickness, "reference_ml": round(total, 2),
                         "periventricular_ml_network": round(by_net, 2), "periventricular_ml_atlas": round(by_atlas, 2),
                         "difference_share": round(abs(by_net - by_atlas) / max(total, 1e-9), 3),
                         "ventricles_ml_network": round(float(found.sum() * np.prod(spacing) / 1000), 1),
                         "ventricles_ml_atlas": round(float(expected.sum() * np.prod(spacing) / 1000), 1),
                         "ventricle_dice": round(dice(found, expected), 3)})
            print(f"labelled {case} {thickness} mm: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()
                                                                 if k not in ("case", "thickness_mm")), flush=True)
    return rows


def clinical(folder: Path, models, ventricle_model, pictures: Path | None) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.nii.gz")):
        image = io.read_image(path)
        result = segment_image(image, models, device="cpu", ventricle_model=ventricle_model)
        split = result.report["location"]
        rows.append({"case": io.case_name(path), "ventricles_ml": split["ventricles_ml"],
                     "volume_ml": result.report["volume_ml"], "periventricular_ml": split["periventricular_ml"],
                     "deep_ml": split["deep_ml"], "seconds": result.report["seconds"]})
        print("clinical " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
        if pictures:
            from DeepWMLLib.qc import png_bytes, render

            pictures.mkdir(parents=True, exist_ok=True)
            # the ventricles drawn as the mask (red), so that the slices shown are theirs
            io.write_bytes(png_bytes(render(image, result.ventricles, f"{rows[-1]['case']}: lateral ventricles "
                                            f"{split['ventricles_ml']} ml", max_tiles=12)),
                           pictures / f"{rows[-1]['case']}_ventricles.png")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ventricle-model", help="model file (default: the shipped one, which segment runs only when "
                                                  "asked: the registry marks no default)")
    parser.add_argument("--synthetic", nargs=2, type=Path, metavar=("MANIFEST", "SPLIT"))
    parser.add_argument("--pictures", type=Path, help="folder for the clinical scans' pictures")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    root = shared_data_dir()
    if root is None:
        print("../shared/data (or DEEPWML_SHARED_DATA) is absent", file=sys.stderr)
        return 1
    models = load_models(default_model_paths())
    if args.ventricle_model is None:  # "default" would be none at all, as in segment
        args.ventricle_model = shipped_models(VENTRICLE_ROLE)[0]["path"]
    figures = {}
    if args.synthetic:
        figures["synthetic"] = synthetic(*args.synthetic, models, args.ventricle_model)
        scores = [r["dice"] for r in figures["synthetic"]]
        print(f"synthetic test cases: {len(scores)}, median Dice {np.median(scores):.3f}, min {min(scores):.3f}")
    figures["labelled"] = labelled(root / "open_ms" / "labelled", root / "templates" / "mni152_tissue_labels.nii.gz",
                                   models, args.ventricle_model)
    figures["clinical"] = clinical(root / "open_ms" / "clinical_flair", models, args.ventricle_model, args.pictures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
