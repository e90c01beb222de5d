"""Render the extension's catalogue image: the bundled synthetic sample segmented by the default model.

    python Testing/benchmarks/render_result_figure.py [OUT.png] [--model FILE]

It is a rendered figure of DeepWML's output (FLAIR slices with the WMH mask outlined, the lesion
volume and the LV group of each slice), not a screenshot of the Slicer window: that needs a real
Slicer, which these machines cannot run. The sample is synthetic, so the image holds no patient data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from DeepWMLLib import io
    from DeepWMLLib.segment import load_models, segment_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "Resources" / "Screenshots" / "DeepWML_result.png"))
    parser.add_argument("--model", nargs="+", help="model file(s) (default: the shipped default model)")
    args = parser.parse_args()

    image = io.read_image(str(ROOT / "Resources" / "Sample" / "sample_flair.nii.gz"))
    result = segment_image(image, load_models(args.model), device="cpu")
    flair, frame = io.to_axial_stack(image)
    mask, _ = io.to_axial_stack(result.mask, dtype=np.uint8)
    slices = result.report["slices"]
    with_lesion = [s["index"] for s in slices if s["area_mm2"] > 0]
    if not with_lesion:
        raise SystemExit("the model found no lesion in the sample; nothing to show")
    load = np.array([s["lv_ml"] for s in slices])
    picks = sorted(set(np.argsort(-load)[:3].tolist()))  # the three slices with the most lesion

    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.6), facecolor="black")
    for ax, k in zip(np.atleast_1d(axes), picks):
        ax.imshow(flair[k], cmap="gray", vmin=np.percentile(flair[k], 1), vmax=np.percentile(flair[k], 99.7),
                  aspect=frame.row_spacing_mm / frame.col_spacing_mm)
        ax.contour(mask[k], levels=[0.5], colors=["#ffcc00"], linewidths=1.0)
        row = slices[k]
        ax.set_title(f"slice {k}: LV {row['lv_ml']:.2f} ml ({row['lv_group']})", color="white", fontsize=10)
        ax.axis("off")
    report = result.report
    names = report["model"]
    model = names[0] if len(names) == 1 else f"ensemble of {len(names)}" + (" (the default)" if not args.model else "")
    fig.suptitle(f"DeepWML - WMH {report['volume_ml']:.1f} ml, {report['lesion_count']} lesions "
                 f"(synthetic sample; model: {model})",
                 color="white", fontsize=11)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80, facecolor="black")
    print(args.out)


if __name__ == "__main__":
    main()
