"""Head scans that are not FLAIRs, rendered from the MNI152 anatomy that `deepwml synth` uses, to see what the
contrast check (DeepWMLLib/contrast.py) calls them: a CT in Hounsfield units, the same CT stored without its rescale
(HU + 1024 as uint16, air near 0 and water near 1024), the CT brain-windowed (0-80 HU to 0-255 or 0-4095), a DWI
trace image at b = 1000 s/mm2 and its ADC map.

Tissue values (drawn per seed within the ranges):

* CT: CSF 5-15 HU, white matter 20-30, grey matter 35-45, skull 700-1500 (tables denser than the diploe), scalp a
  mix of soft tissue (30-50) and fat (-100), air -1000; noise 3-6 HU; 5 mm slices of 0.5-0.9 mm pixels.
* DWI: the b = 0 signal (T2-weighted) of white matter 1, grey matter 1.2-1.4, CSF 2.5-3.5 times it, and ADC
  0.7-0.8, 0.8-0.9 and 2.8-3.2 x 10^-3 mm2/s, so the b = 1000 trace is S0 exp(-b ADC): grey matter about 1.15 and
  CSF about 0.15-0.3 of white matter, as on a FLAIR; fat suppressed (scalp and marrow dark), muscle 0.1 of white
  matter; two acute infarcts (ADC 0.4) in the white matter; EPI blur (1.8 mm acquired), Rician noise 5-8 % of white
  matter everywhere (not zeroed).
* ADC map: x 10^6 mm2/s, 0 where the b = 0 signal is under 15 % of white matter's (air, bone, suppressed fat).

    python Testing/benchmarks/non_flair_kinds.py OUTDIR [--seeds 0 1 2]

writes OUTDIR/KIND_sSEED.nii.gz for the kinds in KINDS; then `deepwml segment OUTDIR -o RESULTS` and read each
report's `contrast`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepWMLLib import synth
from DeepWMLLib.io import write_image

KINDS = ("ct_hu", "ct_raw", "ct_window255", "ct_window4095", "dwi_b1000", "adc")


def _layers(atlas, rng):
    """Outside the intracranial space, by distance d (mm): dura 0-1, skull (inner table, diploe, outer table) to
    1 + bone, scalp to 1 + bone + soft, air beyond. Returns the masks of bone tables, diploe, scalp, and fatness."""
    d = atlas.dist_out * (0.85 + 0.3 * synth._smooth_noise(rng, atlas.dist_out.shape, 40)).astype(np.float32)
    bone = rng.uniform(5.0, 8.0)
    soft = rng.uniform(4.0, 7.0)
    dura = (d > 0) & (d <= 1)
    in_bone = (d > 1) & (d <= 1 + bone)
    diploe = (d > 1 + 0.3 * bone) & (d <= 1 + 0.7 * bone)
    scalp = (d > 1 + bone) & (d <= 1 + bone + soft)
    fatness = np.clip((synth._smooth_noise(rng, d.shape, 5) - 0.45) / 0.1 + 0.5, 0, 1).astype(np.float32)
    return dura, in_bone & ~diploe, in_bone & diploe, scalp, fatness


def _tissue(atlas, values, outside):
    """The template grid's image: brain tissues by their partial volumes, `outside` (already masked) beyond."""
    brain = atlas.gm * values["gm"] + atlas.wm * values["wm"] + atlas.csf * values["csf"]
    return (brain + (1 - atlas.icv) * outside).astype(np.float32)


def _acquire(atlas, image, pixel, thickness, background, blur_mm=0.0, rng=None, tilt=0.0):
    """Resample the 1 mm template image to axial slices (`thickness` mm, averaged over 1 mm sub-slices) of `pixel`
    mm, with a slight tilt about the left-right axis, `background` outside the template."""
    source = sitk.GetImageFromArray(image)
    source.CopyInformation(atlas.reference)
    if blur_mm:
        source = sitk.SmoothingRecursiveGaussian(source, [blur_mm, blur_mm, 0.01])
    size = np.array(atlas.reference.GetSize()) * np.array(atlas.reference.GetSpacing())
    origin = np.array(atlas.reference.GetOrigin())
    n_xy = [int(size[0] / pixel), int(size[1] / pixel)]
    sub = int(round(thickness))
    nz = int(size[2] // thickness)
    fine = sitk.Image([n_xy[0], n_xy[1], nz * sub], sitk.sitkFloat32)
    fine.SetSpacing([pixel, pixel, thickness / sub])
    fine.SetOrigin(origin.tolist())
    fine.SetDirection(atlas.reference.GetDirection())
    centre = atlas.reference.TransformContinuousIndexToPhysicalPoint([n / 2 for n in atlas.reference.GetSize()])
    transform = sitk.Euler3DTransform(centre, math.radians(tilt), 0.0, 0.0)
    array = sitk.GetArrayFromImage(sitk.Resample(source, fine, transform, sitk.sitkLinear, background))
    array = array.reshape(nz, sub, n_xy[1], n_xy[0]).mean(axis=1)
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.SetSpacing([pixel, pixel, thickness])
    out.SetDirection(atlas.reference.GetDirection())
    out.SetOrigin(fine.TransformContinuousIndexToPhysicalPoint([0, 0, (sub - 1) / 2]))
    return out


def _with(image: sitk.Image, array: np.ndarray, dtype) -> sitk.Image:
    out = sitk.GetImageFromArray(array.astype(dtype))
    out.CopyInformation(image)
    return out


def ct(atlas, seed: int) -> dict[str, sitk.Image]:
    rng = np.random.default_rng([4242, seed])
    values = {"csf": rng.uniform(5, 15), "wm": rng.uniform(20, 30), "gm": rng.uniform(35, 45)}
    dura, tables, diploe, scalp, fat = _layers(atlas, rng)
    table_hu, diploe_hu = rng.uniform(1100, 1500), rng.uniform(700, 900)
    soft_hu = rng.uniform(30, 50)
    outside = np.full(atlas.dist_out.shape, -1000.0, np.float32)
    outside[dura] = values["csf"]
    outside[tables] = table_hu
    outside[diploe] = diploe_hu
    outside[scalp] = (soft_hu + (-100 - soft_hu) * fat)[scalp]
    image = _tissue(atlas, values, outside)
    hu = _acquire(atlas, image, rng.uniform(0.5, 0.9), 5.0, -1000.0, tilt=rng.uniform(-10, 10))
    array = sitk.GetArrayFromImage(hu)
    array += rng.normal(0, rng.uniform(3, 6), array.shape).astype(np.float32)
    # the reconstruction's circle: outside it the scanner's padding (-3024 HU here, 0 once stored raw)
    nz, ny, nx = array.shape
    y, x = np.ogrid[:ny, :nx]
    circle = ((y - (ny - 1) / 2) ** 2 + (x - (nx - 1) / 2) ** 2) > (0.5 * max(ny, nx)) ** 2
    array[:, circle] = -3024.0
    hu_int = np.rint(array)
    window = np.clip((hu_int - 0) / 80.0, 0, 1)
    return {
        "ct_hu": _with(hu, hu_int, np.int16),
        "ct_raw": _with(hu, np.clip(hu_int + 1024, 0, 65535), np.uint16),
        "ct_window255": _with(hu, np.rint(window * 255), np.uint8),
        "ct_window4095": _with(hu, np.rint(window * 4095), np.uint16),
    }


def dwi(atlas, seed: int) -> dict[str, sitk.Image]:
    rng = np.random.default_rng([4343, seed])
    s0 = {"wm": 1.0, "gm": rng.uniform(1.2, 1.4), "csf": rng.uniform(2.5, 3.5)}
    adc = {"wm": rng.uniform(0.7, 0.8), "gm": rng.uniform(0.8, 0.9), "csf": rng.uniform(2.8, 3.2)}
    dura, tables, diploe, scalp, fat = _layers(atlas, rng)
    # outside: muscle (S0 0.5, ADC 1.5) and suppressed fat (S0 0.1, ADC 0.05) in the scalp, marrow suppressed, bone 0
    s0_out = np.zeros(atlas.dist_out.shape, np.float32)
    adc_out = np.zeros(atlas.dist_out.shape, np.float32)
    s0_out[dura], adc_out[dura] = s0["csf"], adc["csf"]
    s0_out[diploe], adc_out[diploe] = 0.1, 0.05
    s0_out[scalp] = (0.5 + (0.1 - 0.5) * fat)[scalp]
    adc_out[scalp] = (1.5 + (0.05 - 1.5) * fat)[scalp]
    s0_img = _tissue(atlas, s0, s0_out)
    adc_img = _tissue(atlas, adc, adc_out)
    # two acute infarcts in the white matter: ADC 0.4, S0 1.3
    where = np.argwhere(atlas.wm > 0.9)
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in atlas.wm.shape)]
    for centre in where[rng.choice(len(where), 2, replace=False)]:
        blob = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) < rng.uniform(4, 8) ** 2
        s0_img[blob], adc_img[blob] = 1.3, 0.4
    trace = s0_img * np.exp(-adc_img)  # b = 1000 s/mm2, ADC in 10^-3 mm2/s
    pixel, blur = rng.uniform(0.9, 1.8), 0.8
    scale = rng.uniform(150, 400)  # white matter's b1000 signal
    b1000 = _acquire(atlas, trace * scale / math.exp(-adc["wm"]), pixel, 5.0, 0.0, blur, tilt=rng.uniform(-10, 10))
    b0 = _acquire(atlas, s0_img, pixel, 5.0, 0.0, blur, tilt=0.0)
    adc_map = _acquire(atlas, adc_img, pixel, 5.0, 0.0, blur, tilt=0.0)
    signal = sitk.GetArrayFromImage(b1000)
    sigma = rng.uniform(0.05, 0.08) * scale
    noisy = np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))
    adc_array = sitk.GetArrayFromImage(adc_map) * 1000 * rng.normal(1, 0.05, signal.shape)
    adc_array[sitk.GetArrayFromImage(b0) < 0.15] = 0
    return {"dwi_b1000": _with(b1000, np.rint(noisy), np.uint16),
            "adc": _with(adc_map, np.clip(np.rint(adc_array), 0, 65535), np.uint16)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    atlas = synth._atlas(synth._require_shared_dir())
    args.outdir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for kind, image in {**ct(atlas, seed), **dwi(atlas, seed)}.items():
            write_image(image, args.outdir / f"{kind}_s{seed}.nii.gz")
            print(kind, seed, image.GetSize(), [round(s, 2) for s in image.GetSpacing()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
