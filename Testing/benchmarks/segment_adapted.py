"""Segment scans as `deepwml segment` does, but with the models' batch-norm statistics first
re-estimated on each scan itself (`DeepWMLLib.adapt.adapt_to_scan`; experimental, PyTorch).

    python Testing/benchmarks/segment_adapted.py SCAN [SCAN ...] -o OUT [--model FILE ...]

Writes OUT/<case>_wmh.nii.gz (the mask on the scan's grid) and OUT/<case>_report.json for each scan,
as `deepwml segment` names them, so that scalp_zone.py can read the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.adapt import adapt_to_scan  # noqa: E402
from DeepWMLLib.segment import load_brain_model, load_models, segment_image  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scans", nargs="+")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--model", nargs="+", help="model files (default: the shipped default ensemble)")
    args = parser.parse_args(argv)
    models = load_models(args.model)
    brain = load_brain_model("default")
    args.output.mkdir(parents=True, exist_ok=True)
    for scan in args.scans:
        case = io.case_name(Path(scan))
        start = time.perf_counter()
        image = io.read_image(scan)
        result = segment_image(image, adapt_to_scan(image, models), device="cpu", brain_model=brain)
        sitk.WriteImage(result.mask, str(args.output / f"{case}_wmh.nii.gz"), True)
        report = dict(result.report, seconds_with_adapting=round(time.perf_counter() - start, 1))
        (args.output / f"{case}_report.json").write_text(json.dumps(report, indent=1))
        print(f"{case}: {report['volume_ml']:.2f} ml, {report['seconds_with_adapting']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
