"""A DICOM Segmentation (SEG) given as a mask: a rater's outline from PACS or OHIF, or DeepWML's own `segment
--dicom-seg`, read by evaluate, consensus, change and train wherever a mask is read (io.read_mask: io.read_dicom_seg,
its functional groups parsed by io itself). Made here with highdicom (a test dependency) in the ways PACS tools
write them: without their empty frames, of several segments, FRACTIONAL."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.cli import main
from DeepWMLLib.errors import DeepWMLError

from conftest import in_folder, rotation, stepped_positions, write_dicom_series

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from test_dicom_seg import LESION, PATIENT, phantom, source_series  # noqa: E402  (after the skips: it imports pydicom itself)


def rater_mask(flair: sitk.Image, seed: int = 0) -> np.ndarray:
    """A rater's mask on the phantom (slices, rows, columns): its lesion, less a few voxels (seeded), and slices
    0, 3 and 5 left empty, the phantom's 2 is (their frames omitted in a sparse SEG: its grid spans slices 1 to 6)."""
    mask = (sitk.GetArrayFromImage(flair) >= LESION).astype(np.uint8)
    rng = np.random.default_rng(seed)
    mask[rng.random(mask.shape) < 0.15] = 0
    mask[[0, 3, 5]] = 0
    return mask


def highdicom_seg(folder, out, segments: dict, kind: str = "BINARY", omit: bool = True, syntax: str | None = None,
                  numbers: list | None = None):
    """A SEG of the source series in `folder` (an axial phantom: slice k at the k-th lowest position) written by
    highdicom to `out`: one segment per (label, array of slices, rows, columns), `omit` leaving out empty frames;
    in transfer syntax `syntax` (highdicom's default: Explicit VR Little Endian); of Segment Numbers `numbers`
    (else 1, 2...). A LABELMAP one takes one array of segment numbers (its values): {label: that array, label: None}."""
    sources = sorted((pydicom.dcmread(p) for p in sorted(folder.iterdir())),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    for source in sources:  # the phantom's files give GDCM's Spacing Between Slices, 1 mm, which highdicom copies
        source.SpacingBetweenSlices = source.SliceThickness  # (the phantoms' slices touch)
    codes = pydicom.sr.codedict.codes
    descriptions = [hd.seg.SegmentDescription(
        segment_number=numbers[k] if numbers else k + 1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for k, label in enumerate(segments)]
    pixels = next(iter(segments.values())) if kind == "LABELMAP" else np.stack(list(segments.values()), axis=-1)
    fractional = kind == "FRACTIONAL"
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels.astype(np.float32 if fractional else np.uint16 if kind == "LABELMAP"
                                                          else np.uint8),
        segmentation_type=getattr(hd.seg.SegmentationTypeValues, kind), segment_descriptions=descriptions,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY if fractional else None,
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="OHIF", manufacturer_model_name="viewer", software_versions="3", device_serial_number="1",
        omit_empty_frames=omit, **({"transfer_syntax_uid": syntax} if syntax else {}))
    seg.save_as(out)
    return seg


def as_file(array: np.ndarray, like: sitk.Image, path) -> str:
    """The mask as a file on the scan's grid: NRRD, whose voxel size is a double as the SEG's is (NIfTI's float32
    one puts volumes 1e-7 off)."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return str(path)


def evaluated(tmp_path, prediction, reference, name: str) -> dict:
    assert main(["evaluate", "--prediction", str(prediction), "--reference", str(reference), "--json",
                 str(tmp_path / f"{name}.json")]) == 0
    return json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture
def phantom_case(tmp_path):
    """(the source series' folder, the FLAIR as read, a prediction file on it: the phantom's whole lesion)."""
    folder = source_series(tmp_path / "flair")
    flair = io.read_image(folder)
    prediction = as_file(sitk.GetArrayFromImage(flair) >= LESION, flair, tmp_path / "prediction.nrrd")
    return folder, flair, prediction


def test_deepwmls_own_seg_as_the_reference_gives_dice_1(tmp_path, tiny_model):
    """`segment --dicom-seg` on an oblique DICOM series; its SEG (a file, or its folder) given to `deepwml
    evaluate --reference` against the mask file it was made with: Dice 1 exactly, the same lesions. It was refused
    as an unsupported file type (a folder: a lone SEG, 'not a scan')."""
    folder = source_series(tmp_path / "flair", direction=rotation(0.12, -0.08, 0.3))
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-o", str(out), "--model", str(tiny_model), "--device", "cpu",
                 "--no-brain-mask", "--dicom-seg"]) == 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "flair_wmh.nrrd"))).any()
    result = evaluated(tmp_path, out / "flair_wmh.nrrd", out / "flair_wmh_seg.dcm", "own")
    assert result["dice"] == 1.0 and result["n_reference_lesions"] == result["n_predicted_lesions"] > 0
    (tmp_path / "pacs").mkdir()
    shutil.copy(out / "flair_wmh_seg.dcm", tmp_path / "pacs" / "IM0001")  # as PACS exports it: a folder, no extension
    assert evaluated(tmp_path, out / "flair_wmh.nrrd", tmp_path / "pacs", "folder")["dice"] == 1.0
    mask = io.read_mask(tmp_path / "pacs", io.read_image(folder))
    assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(sitk.ReadImage(str(out / "flair_wmh.nrrd"))))


def _same_figures(a: dict, b: dict) -> None:
    keys = ("dice", "sensitivity", "precision", "hd95_mm", "avd_percent", "lesion_f1", "n_reference_lesions",
            "n_predicted_lesions", "reference_volume_ml", "prediction_volume_ml")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_a_sparse_seg_gives_the_figures_of_the_same_mask_as_file(tmp_path, phantom_case):
    """highdicom's default leaves out empty frames: slices 1, 4 and 6 of 7 given; the grid spans the frames
    present and is padded onto the prediction's (evaluate) and the FLAIR's (read_mask with it)."""
    folder, flair, prediction = phantom_case
    mask = rater_mask(flair)
    seg = highdicom_seg(folder, tmp_path / "rater.dcm", {"WMH": mask})
    assert int(seg.NumberOfFrames) == 3
    alone = io.read_mask(tmp_path / "rater.dcm")
    assert alone.GetSize() == (40, 28, 6) and np.allclose(alone.GetOrigin(), (-12, 20, -26))  # slices 1 to 6
    on_flair = io.read_mask(tmp_path / "rater.dcm", flair)
    assert np.array_equal(sitk.GetArrayFromImage(on_flair), mask)
    _same_figures(evaluated(tmp_path, prediction, tmp_path / "rater.dcm", "seg"),
                  evaluated(tmp_path, prediction, as_file(mask, flair, tmp_path / "rater.nrrd"), "file"))


def test_segments_wmh_alone_else_all_but_the_ventricles(tmp_path, phantom_case, caplog):
    """Two segments, WMH and another: WMH alone is lesion (figures as the WMH mask's file). Without a WMH
    segment, every segment but 'Lateral ventricles' is, joined (a warning names them), as a .seg.nrrd is read."""
    folder, flair, prediction = phantom_case
    wmh, other = rater_mask(flair, 1), np.zeros((7, 28, 40), np.uint8)
    other[:, 20:24, 20:30] = 1
    highdicom_seg(folder, tmp_path / "two.dcm", {"Brain": other, "wmh": wmh})
    _same_figures(evaluated(tmp_path, prediction, tmp_path / "two.dcm", "two"),
                  evaluated(tmp_path, prediction, as_file(wmh, flair, tmp_path / "wmh.nrrd"), "wmh"))
    highdicom_seg(folder, tmp_path / "raters.dcm", {"lesion": wmh, "uncertain": other, "Lateral ventricles": other})
    assert io.lesion_segment_names(tmp_path / "raters.dcm") == ["lesion", "uncertain"]
    with caplog.at_level(logging.WARNING):
        joined = io.read_mask(tmp_path / "raters.dcm", flair)
    assert np.array_equal(sitk.GetArrayFromImage(joined), wmh | other)
    assert "none labelled WMH (lesion, uncertain); all of them are read as lesion" in caplog.text
    highdicom_seg(folder, tmp_path / "ventricles.dcm", {"Lateral ventricles": other})
    with pytest.raises(DeepWMLError, match=r"ventricles\.dcm: the DICOM Segmentation has no lesion segment"):
        io.read_mask(tmp_path / "ventricles.dcm")


def test_a_fractional_seg_is_lesion_at_half_its_maximum(tmp_path, phantom_case):
    """FRACTIONAL (8 bits, Maximum Fractional Value 255): a voxel of probability 0.6 is lesion, of 0.4 is not."""
    folder, flair, prediction = phantom_case
    mask = rater_mask(flair, 2)
    probability = np.where(mask > 0, 0.6, 0.0)
    probability[:, 20:24, 20:30] = 0.4
    highdicom_seg(folder, tmp_path / "fractional.dcm", {"WMH": probability}, kind="FRACTIONAL", omit=False)
    _same_figures(evaluated(tmp_path, prediction, tmp_path / "fractional.dcm", "fractional"),
                  evaluated(tmp_path, prediction, as_file(mask, flair, tmp_path / "mask.nrrd"), "file"))


def test_frames_between_slices_or_in_another_orientation_are_refused(tmp_path, phantom_case):
    """A frame moved half a slice, one shifted within its plane (a tilt), one turned: refused, naming the SEG."""
    folder, flair, _ = phantom_case
    highdicom_seg(folder, tmp_path / "good.dcm", {"WMH": rater_mask(flair)}, omit=False)

    def altered(name, change):
        ds = pydicom.dcmread(tmp_path / "good.dcm")
        change(ds.PerFrameFunctionalGroupsSequence[3])
        ds.save_as(tmp_path / name)
        return tmp_path / name

    def move(by):
        def change(item):
            item.PlanePositionSequence[0].ImagePositionPatient = [
                float(v) + d for v, d in zip(item.PlanePositionSequence[0].ImagePositionPatient, by)]
        return change

    with pytest.raises(DeepWMLError, match=r"between\.dcm: the DICOM Segmentation has frames between slices: frame 4 "
                                           r"lies 3\.5 slices from the first"):
        io.read_mask(altered("between.dcm", move((0, 0, 2.5))))
    with pytest.raises(DeepWMLError, match=r"tilt\.dcm: the DICOM Segmentation has frames shifted within their plane"):
        io.read_mask(altered("tilt.dcm", move((0.3, 0, 0))))

    def turn(item):
        item.PlaneOrientationSequence = [pydicom.Dataset()]
        item.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(DeepWMLError, match=r"turned\.dcm: the DICOM Segmentation has frames in other orientations"):
        io.read_mask(altered("turned.dcm", turn))


def test_consensus_of_two_raters_segs(tmp_path, phantom_case):
    """`deepwml consensus` of two raters' SEGs, one without its empty frames: the figures of the same masks as
    files, slice for slice."""
    folder, flair, _ = phantom_case
    a, b = rater_mask(flair, 3), rater_mask(flair, 4)
    highdicom_seg(folder, tmp_path / "a.dcm", {"WMH": a})  # its empty frames left out: padded onto b's grid
    highdicom_seg(folder, tmp_path / "b.dcm", {"WMH": b}, omit=False)
    results = []
    for name, pair in (("seg", (tmp_path / "a.dcm", tmp_path / "b.dcm")),
                       ("file", (as_file(a, flair, tmp_path / "a.nrrd"), as_file(b, flair, tmp_path / "b.nrrd")))):
        assert main(["consensus", str(pair[0]), str(pair[1]), "--json", str(tmp_path / f"{name}.json")]) == 0
        results.append(json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8")))
    assert results[0]["dice"] == results[1]["dice"] < 1
    assert results[0] == results[1]


def test_change_with_a_seg_as_the_follow_up_mask(tmp_path, phantom_case):
    """`deepwml change --followup-mask RATER.dcm` (a sparse SEG) on the DICOM follow-up: as the mask file."""
    folder, flair, _ = phantom_case
    baseline = tmp_path / "baseline.nrrd"
    sitk.WriteImage(flair, str(baseline))
    earlier, later = rater_mask(flair, 5), rater_mask(flair, 6)
    earlier[4:] = 0  # fewer lesions at baseline
    highdicom_seg(folder, tmp_path / "later.dcm", {"WMH": later})
    reports = []
    for name, mask in (("seg", tmp_path / "later.dcm"), ("file", as_file(later, flair, tmp_path / "later.nrrd"))):
        out = tmp_path / f"change_{name}"
        assert main(["change", str(baseline), str(folder), "-o", str(out), "--baseline-mask",
                     as_file(earlier, flair, tmp_path / "earlier.nrrd"), "--followup-mask", str(mask)]) == 0
        report = json.loads(next(out.glob("*_change.json")).read_text(encoding="utf-8"))
        reports.append({k: v for k, v in report.items() if "ml" in k or "count" in k})
    assert reports[0] == reports[1] and reports[0]


def test_train_reads_segs_in_its_manifest(tmp_path, caplog):
    """`deepwml train`'s manifest: a case's mask DeepWML's own SEG of its DICOM FLAIR, another's a rater's SEG of
    two segments, 'Lesion' and 'Brain' (joined, and pointed out as a .seg.nrrd's are): both prepared and trained."""
    from test_train import _split_file, make_dataset, tiny_config

    from conftest import write_dicom_series
    from DeepWMLLib import dicom_seg
    from DeepWMLLib import train as training

    manifest = make_dataset(tmp_path / "data", n_cases=5)
    folder = manifest.parent
    text = manifest.read_text(encoding="utf-8")
    for k, case in enumerate(("c0", "c1")):
        scan = sitk.Cast(sitk.ReadImage(str(folder / f"{case}_flair.nii.gz")), sitk.sitkInt16)
        series = write_dicom_series(folder / f"{case}_dicom", scan, uid=f"1.2.3.4.{k + 10}", description="AX FLAIR",
                                    extra={"0020|0052": "1.2.3.9"})
        flair = io.read_image(series)
        mask = io.read_mask(folder / f"{case}_mask.nii.gz", flair)
        if case == "c0":
            made = dicom_seg.segmentation(flair, mask, io.choose_dicom_series(series)[0], {"volume_ml": 0.0,
                                                                                         "lesion_count": 0})
            io.write_bytes(made.data, folder / f"{case}_seg.dcm")
        else:
            highdicom_seg(series, folder / f"{case}_seg.dcm", {
                "Lesion": sitk.GetArrayFromImage(mask), "Brain": (sitk.GetArrayFromImage(flair) > 50).astype(np.uint8)})
        assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(folder / f"{case}_seg.dcm", flair)),
                              sitk.GetArrayFromImage(mask) | (sitk.GetArrayFromImage(flair) > 50) * (case == "c1"))
        text = text.replace(f"{case}_flair.nii.gz", f"{case}_dicom").replace(f"{case}_mask.nii.gz", f"{case}_seg.dcm")
    manifest.write_text(text, encoding="utf-8")
    split = _split_file(tmp_path / "split.csv", {"c0": "train", "c1": "train", "c2": "train", "c3": "val", "c4": "test"})
    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        best = training.train(tiny_config(manifest, split=str(split), epochs=1, samples_per_epoch=8), tmp_path / "run")
    assert best.is_file()
    assert ("1 case(s) are segmentations (Slicer .seg.nrrd, DICOM SEG) of several segments, none named WMH "
            "(c1 (Lesion, Brain))") in caplog.text


def test_a_sparse_seg_without_spacing_between_slices_is_placed_by_its_positions(tmp_path, phantom_case):
    """A sparse SEG whose Pixel Measures give no Spacing Between Slices (highdicom copies it only where the source
    images give it; many 2D FLAIRs do not): frames on slices 1, 4 and 6, steps of 3 and 2 slices. Its grid is the
    largest step of which every frame's offset is a whole multiple (1 slice), not the smallest step (2 slices), on
    which slice 4 lay 'between slices' and the SEG was refused."""
    folder, flair, prediction = phantom_case
    mask = rater_mask(flair)
    highdicom_seg(folder, tmp_path / "spaced.dcm", {"WMH": mask})
    ds = pydicom.dcmread(tmp_path / "spaced.dcm")
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    del measures.SpacingBetweenSlices
    ds.save_as(tmp_path / "rater.dcm")
    on_flair = io.read_mask(tmp_path / "rater.dcm", flair)
    assert np.array_equal(sitk.GetArrayFromImage(on_flair), mask)
    _same_figures(evaluated(tmp_path, prediction, tmp_path / "rater.dcm", "seg"),
                  evaluated(tmp_path, prediction, as_file(mask, flair, tmp_path / "rater.nrrd"), "file"))


def test_a_seg_in_a_folder_below_or_beside_its_flair_given_as_a_mask(tmp_path, phantom_case):
    """A mask folder as PACS exports a study (one folder per series: the SEG in rater/SE300/IM0001) was refused as
    'only a DICOM Segmentation ... not a scan; give the folder of the FLAIR series' (choose_dicom_series's refusal
    of a lone SEG as a FLAIR; GDCM had read it before SEGs were read). A folder holding the FLAIR series and its SEG
    (a study exported as one folder), given as a mask, had its FLAIR read as the mask ('looks like a scan'): the
    SEG is the mask in both. Two SEGs beside each other are refused, naming them."""
    folder, flair, _ = phantom_case
    mask = rater_mask(flair)
    (tmp_path / "rater" / "SE300").mkdir(parents=True)
    highdicom_seg(folder, tmp_path / "rater" / "SE300" / "IM0001", {"WMH": mask})
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "rater", flair)), mask)
    study = tmp_path / "study"
    shutil.copytree(folder, study)
    shutil.copy(tmp_path / "rater" / "SE300" / "IM0001", study / "seg.dcm")
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(study, flair)), mask)
    highdicom_seg(folder, study / "other.dcm", {"WMH": mask})
    with pytest.raises(DeepWMLError, match=r"study holds 2 DICOM Segmentation series .*give the file of the one"):
        io.read_mask(study, flair)


def test_a_labelmap_seg_reads_its_lesion_segments(tmp_path, phantom_case):
    """LABELMAP (Label Map Segmentation Storage, DICOM 2024): one frame a slice, each pixel its segment's number,
    0 background. Its WMH segment is lesion (figures as the mask's file), else every segment but the ventricles;
    8 bits, and 16 where a segment's number passes 255; without its empty frames. It was refused as of Segmentation
    Type LABELMAP (and, of another SOP class, not known for a SEG)."""
    folder, flair, prediction = phantom_case
    wmh, other = rater_mask(flair, 3), np.zeros((7, 28, 40), np.uint8)
    other[1:6, 20:24, 20:30] = 1
    labels = np.where(wmh > 0, 2, np.where(other > 0, 1, 0)).astype(np.uint16)
    seg = highdicom_seg(folder, tmp_path / "labelmap.dcm", {"Lateral ventricles": labels, "WMH": None}, kind="LABELMAP")
    assert seg.SOPClassUID == io.LABEL_MAP_SEGMENTATION_STORAGE and int(seg.BitsAllocated) == 8
    assert not any(item.get("SegmentIdentificationSequence") for item in seg.PerFrameFunctionalGroupsSequence)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "labelmap.dcm", flair)), wmh)
    _same_figures(evaluated(tmp_path, prediction, tmp_path / "labelmap.dcm", "labelmap"),
                  evaluated(tmp_path, prediction, as_file(wmh, flair, tmp_path / "wmh.nrrd"), "file"))
    assert io.lesion_segment_names(tmp_path / "labelmap.dcm") == ["WMH"]
    # no WMH segment: all but the ventricles (the background, segment 0, is none of them); 16 bits
    labels16 = np.where(wmh > 0, 300, np.where(other > 0, 7, 0)).astype(np.uint16)
    labels16[:, 0:3, 0:5] = 9
    seg = highdicom_seg(folder, tmp_path / "sixteen.dcm", {"Lateral ventricles": labels16, "Edema": None,
                                                           "lesion": None}, kind="LABELMAP", numbers=[7, 9, 300])
    assert int(seg.BitsAllocated) == 16
    assert io.lesion_segment_names(tmp_path / "sixteen.dcm") == ["Edema", "lesion"]
    edema = (labels16 == 9).astype(np.uint8)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "sixteen.dcm", flair)), wmh | edema)


def _rle_binary(source, out, packed: bool) -> None:
    """The BINARY SEG `source` stored RLE Lossless by pydicom's RLE encoder (highdicom will not compress BINARY),
    each frame as its bits packed (the first pixel in the lowest bit, as pydicom 3.1 does) or one byte a pixel
    (vtk-dicom, dcmjs)."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels.encoders import RLELosslessEncoder
    from pydicom.pixels.utils import pack_bits

    ds = pydicom.dcmread(source)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    fragments = []
    for frame in frames:
        data = np.frombuffer(pack_bits(frame), np.uint8) if packed else frame.astype(np.uint8).ravel()
        fragments.append(RLELosslessEncoder.encode(
            data.tobytes(), rows=1 if packed else frame.shape[0], columns=data.size if packed else frame.shape[1],
            samples_per_pixel=1, bits_allocated=8, bits_stored=8,
            pixel_representation=0, photometric_interpretation="MONOCHROME2", number_of_frames=1))
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    ds.save_as(out, enforce_file_format=True)


def test_rle_and_deflated_segs_read_as_the_same_mask(tmp_path, phantom_case):
    """RLE Lossless (PS3.5 Annex G) and Deflated Explicit VR Little Endian SEGs, decoded by DeepWML itself: BINARY
    (its 1-bit frames packed or a byte a pixel), FRACTIONAL and LABELMAP by highdicom, each read as the mask its
    uncompressed one is, and as the mask's NRRD file; each was refused as of a transfer syntax DeepWML does not
    decode."""
    folder, flair, prediction = phantom_case
    mask = rater_mask(flair, 4)
    highdicom_seg(folder, tmp_path / "plain.dcm", {"WMH": mask})
    _rle_binary(tmp_path / "plain.dcm", tmp_path / "packed.dcm", packed=True)
    _rle_binary(tmp_path / "plain.dcm", tmp_path / "bytes.dcm", packed=False)
    probability = np.where(mask > 0, 0.9, 0.0)
    probability[:, 20:24, 20:30] = 0.3
    highdicom_seg(folder, tmp_path / "fractional.dcm", {"WMH": probability}, kind="FRACTIONAL",
                  syntax=pydicom.uid.RLELossless)
    highdicom_seg(folder, tmp_path / "labelmap.dcm", {"WMH": mask * 1}, kind="LABELMAP", syntax=pydicom.uid.RLELossless)
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert (tmp_path / "deflated.dcm").stat().st_size < (tmp_path / "plain.dcm").stat().st_size
    for name in ("packed", "bytes", "fractional", "labelmap", "deflated"):
        assert pydicom.dcmread(tmp_path / f"{name}.dcm").file_meta.TransferSyntaxUID != pydicom.uid.ExplicitVRLittleEndian
        assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / f"{name}.dcm", flair)), mask), name
    _same_figures(evaluated(tmp_path, prediction, tmp_path / "packed.dcm", "packed"),
                  evaluated(tmp_path, prediction, as_file(mask, flair, tmp_path / "mask.nrrd"), "file"))


def test_a_damaged_rle_or_deflated_seg_is_refused_naming_it(tmp_path, phantom_case):
    """An RLE frame whose header gives 3 segments for an 8-bit frame, one cut short, frames each split over two
    fragments (which DICOM does not allow for RLE) or one missing, a deflated data set cut short: refused naming
    the file, never read as a mask of whatever came out."""
    folder, flair, _ = phantom_case
    mask = rater_mask(flair, 5)
    highdicom_seg(folder, tmp_path / "rle.dcm", {"WMH": mask * 1}, kind="LABELMAP", syntax=pydicom.uid.RLELossless)
    data = (tmp_path / "rle.dcm").read_bytes()
    header = b"\x01\x00\x00\x00\x40\x00\x00\x00"
    assert header in data
    (tmp_path / "count.dcm").write_bytes(data.replace(header, b"\x03" + header[1:], 1))
    with pytest.raises(DeepWMLError, match=r"count\.dcm: the DICOM Segmentation has RLE Lossless frame 1 damaged "
                                           r"\(its RLE header gives 3 segments, not 1\)"):
        io.read_mask(tmp_path / "count.dcm")
    ds = pydicom.dcmread(tmp_path / "rle.dcm")
    from pydicom.encaps import encapsulate, generate_fragments

    fragments = list(generate_fragments(ds.PixelData))[1:]  # (after the Basic Offset Table)
    fragments[2] = fragments[2][:70]  # a frame cut short: its runs end before its pixels do
    ds.PixelData = encapsulate(fragments)
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(DeepWMLError, match=r"short\.dcm: the DICOM Segmentation has RLE Lossless frame 3 damaged"):
        io.read_mask(tmp_path / "short.dcm")
    # each frame split over two fragments (the Basic Offset Table saying where each begins): PS3.5 A.4.2 has an RLE
    # frame in exactly one, and the refusal says so; a frame's fragment missing: a damaged file
    whole = list(generate_fragments(pydicom.dcmread(tmp_path / "rle.dcm").PixelData))[1:]
    ds.PixelData = encapsulate(whole, fragments_per_frame=2, has_bot=True)
    ds.save_as(tmp_path / "split.dcm")
    with pytest.raises(DeepWMLError, match=rf"split\.dcm: the DICOM Segmentation is RLE Lossless with {2 * len(whole)} "
                                           rf"fragments of Pixel Data for its {len(whole)} frames: DICOM stores each RLE "
                                           r"frame in exactly one fragment \(PS3\.5 A\.4\.2\)"):
        io.read_mask(tmp_path / "split.dcm")
    ds.PixelData = encapsulate(whole[:-1])
    ds.save_as(tmp_path / "missing.dcm")
    with pytest.raises(DeepWMLError, match=rf"missing\.dcm: the DICOM Segmentation is RLE Lossless with {len(whole) - 1} "
                                           rf"fragments of Pixel Data for its {len(whole)} frames .*frames are missing"):
        io.read_mask(tmp_path / "missing.dcm")
    highdicom_seg(folder, tmp_path / "plain.dcm", {"WMH": mask})
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    (tmp_path / "cut.dcm").write_bytes((tmp_path / "deflated.dcm").read_bytes()[:-40])
    with pytest.raises(DeepWMLError, match=r"cut\.dcm: the DICOM Segmentation is deflated, and its deflated data set "
                                           r"is cut short"):
        io.read_mask(tmp_path / "cut.dcm")


def test_deepwml_change_segmentation_read_as_a_mask_is_the_follow_ups_lesions_as_its_seg(tmp_path, phantom_case, caplog):
    """`deepwml change`'s CASE_change.seg.nrrd (a segment per call, named as the calls: all seven) read wherever a mask
    is read is the follow-up's lesions, as its change SEG of the same label map is (io.read_dicom_seg): gone and small
    gone (baseline lesions no longer there) left out, a warning naming them; train's lesion_segment_names the same.
    Both were read differently: the .seg.nrrd joined every segment, gone ones too. A .seg.nrrd whose segments are
    named as calls, 'new' and 'gone' alone (the change .seg.nrrd edited in Slicer, or a rater's marking change), is
    read by the same rule as the Slicer module reads it (io.is_change_segmentation): 'gone' marks a lesion no longer
    there, no follow-up lesion; a rater's segment of another name is joined as before."""
    from DeepWMLLib import change

    folder, flair, _ = phantom_case
    series, _ = io.choose_dicom_series(folder)
    labels = np.zeros(sitk.GetArrayViewFromImage(flair).shape, np.uint8)
    labels[1, 2:5, 3:6], labels[3, 8:10, 1:12], labels[4, 0:3, 0:3], labels[5, 12:14, 15:17] = 2, 1, 5, 7
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(flair)
    followup = np.isin(labels, [1, 2, 3, 4, 6]).astype(np.uint8)
    report = {"tolerance_mm": 2.0, "min_change_ml": 0.02, "enlarge_fraction": 1.0, "enlarge_min_ml": 0.05,
              "presence": None, "registration": {"reliable": True}, "masks": {}}
    io.write_bytes(change.change_seg(flair, image, series, report).data, tmp_path / "c_change_seg.dcm")
    io.write_label_segmentation(image, tmp_path / "c_change.seg.nrrd",
                                [(value, name, change.COLOURS[value]) for value, name in change.LABELS.items()])
    for path in (tmp_path / "c_change_seg.dcm", tmp_path / "c_change.seg.nrrd"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            mask = io.read_mask(path, flair)
        assert np.array_equal(sitk.GetArrayFromImage(mask), followup), path.name
        assert "gone, small gone left out" in caplog.text, path.name
    assert io.lesion_segment_names(tmp_path / "c_change.seg.nrrd") == ["stable", "new", "enlarging", "not assessable",
                                                                       "small new"]
    io.write_label_segmentation(image, tmp_path / "rater.seg.nrrd", [(2, "new", (1, 0, 0)), (5, "gone", (0, 0, 1))])
    assert io.lesion_segment_names(tmp_path / "rater.seg.nrrd") == ["new"]
    io.write_label_segmentation(image, tmp_path / "other.seg.nrrd", [(2, "new", (1, 0, 0)), (5, "lesion", (0, 0, 1))])
    assert io.lesion_segment_names(tmp_path / "other.seg.nrrd") == ["new", "lesion"]
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "rater.seg.nrrd", flair)),
                          (labels == 2).astype(np.uint8))
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "other.seg.nrrd", flair)),
                          np.isin(labels, [2, 5]).astype(np.uint8))


def test_an_rle_or_labelmap_seg_in_a_folder_below_given_as_a_mask(tmp_path, phantom_case):
    """A study exported as one folder per series (rater/SE300/IM0001) whose SEG the DICOM library's scan passes over
    (RLE-compressed 1-bit frames, a LABELMAP SEG) was refused as 'compressed in a way GDCM cannot decode' or as a
    folder without a series: only the folder's own files were looked at. The one below is the mask; two below are
    refused, naming them by their place under the folder."""
    folder, flair, _ = phantom_case
    mask = rater_mask(flair)
    highdicom_seg(folder, tmp_path / "plain.dcm", {"WMH": mask})
    (tmp_path / "rle" / "SE300").mkdir(parents=True)
    _rle_binary(tmp_path / "plain.dcm", tmp_path / "rle" / "SE300" / "IM0001", packed=True)
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "rle", flair)), mask)
    (tmp_path / "labelmap" / "SE301").mkdir(parents=True)
    highdicom_seg(folder, tmp_path / "labelmap" / "SE301" / "IM0001", {"WMH": mask * 1}, kind="LABELMAP")
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "labelmap", flair)), mask)
    (tmp_path / "labelmap" / "SE302").mkdir()
    shutil.copy(tmp_path / "rle" / "SE300" / "IM0001", tmp_path / "labelmap" / "SE302" / "IM0001")
    with pytest.raises(DeepWMLError, match=r"labelmap holds 2 DICOM Segmentation files \(SE301/IM0001, SE302/IM0001\)"):
        io.read_mask(tmp_path / "labelmap", flair)


def test_a_sparse_seg_of_an_uneven_series_read_alone_is_refused_saying_to_give_the_series(tmp_path, capsys):
    """A third party's SEG without its empty frames (highdicom's default) of an unevenly spaced series (slices 0, 5,
    10.6, 15, 20, 25.8, 30 mm up), whose lowest frame is slice 2, not the series' first: read alone its frames lie on
    no grid of their own (offsets from the lowest, 4.4, 9.4, 15.2 mm). It was refused with advice to export it again
    on the scan's slices, which it is on already; now the advice is to give the FLAIR's series, and `deepwml evaluate`
    and `consensus` take it as --flair (without --qc, which it had to go with), placing each frame by the image it
    names: the mask, Dice 1 against the same mask as a file."""
    folder, series, flair, mask, prediction = sparse_seg_of_an_uneven_series(tmp_path)
    with pytest.raises(DeepWMLError, match=r"rater\.dcm: the DICOM Segmentation has frames between slices.*: its frames "
                                           r"each name the source image they were drawn on: give the FLAIR's DICOM "
                                           r"series with it, as a folder \(deepwml evaluate and consensus: --flair FOLDER; export, "
                                           r"change and train: the FLAIR; a manifest: its flair column\)"):
        io.read_mask(tmp_path / "rater.dcm")
    assert np.array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "rater.dcm", flair, source=series)), mask)
    evaluate = ["evaluate", "--prediction", str(prediction), "--reference", str(tmp_path / "rater.dcm"), "--json",
                str(tmp_path / "e.json")]
    assert main(evaluate) == 1
    assert "its frames each name the source image" in capsys.readouterr().err
    assert main(evaluate + ["--flair", str(folder)]) == 0
    assert json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))["dice"] == 1.0
    assert main(["consensus", str(tmp_path / "rater.dcm"), str(prediction), "--flair", str(folder), "--json",
                 str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["dice"] == 1.0
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b,flair\nc1,rater.dcm,prediction.nrrd,flair\n",
                                         encoding="utf-8")
    assert main(["consensus", "--manifest", str(tmp_path / "raters.csv"), "-o", str(tmp_path / "out")]) == 0
    assert "1 case checked at Dice >= 0.85: 1 pass" in capsys.readouterr().out



def test_the_flair_folder_two_raters_segs_are_placed_by_is_read_once(tmp_path, header_reads, monkeypatch):
    """consensus --flair FOLDER of two raters' SEGs (io.mask_source for each), a manifest of two rows naming that
    FLAIR, evaluate --flair FOLDER: the FLAIR folder's headers were read for every SEG (twice; six times for the
    manifest, its QC picture's FLAIR with them); now once per run, the figures those of every reading made."""
    folder, _, _, mask, _ = sparse_seg_of_an_uneven_series(tmp_path)
    other = mask.copy()
    other[4] = 0
    highdicom_seg(folder, tmp_path / "rater_b.dcm", {"WMH": other})
    (tmp_path / "raters.csv").write_text("case,rater_a,rater_b,flair\nc1,rater.dcm,rater_b.dcm,flair\n"
                                         "c2,rater_b.dcm,rater.dcm,flair\n", encoding="utf-8")
    runs = {"pair": ["consensus", str(tmp_path / "rater.dcm"), str(tmp_path / "rater_b.dcm"), "--flair", str(folder)],
            "manifest": ["consensus", "--manifest", str(tmp_path / "raters.csv")],
            "evaluate": ["evaluate", "--prediction", str(tmp_path / "rater_b.dcm"), "--reference",
                         str(tmp_path / "rater.dcm"), "--flair", str(folder)]}
    results = {}
    for how, times in (("once", {"pair": 1, "manifest": 1, "evaluate": 1}),
                       ("each", {"pair": 2, "manifest": 6, "evaluate": 2})):
        with monkeypatch.context() as m:
            if how == "each":  # nothing remembered: the old readings
                m.setattr(io, "_folder_state", lambda root, recursive: None)
            for name, command in runs.items():
                header_reads.clear()
                out = tmp_path / f"{how}_{name}"
                assert main(command + (["-o", str(out)] if name == "manifest" else ["--json", str(out)])) == 0
                assert in_folder(header_reads, folder) == {times[name]: 7}, (how, name)
                results[how, name] = (out / "consensus.csv").read_text(encoding="utf-8") if name == "manifest" \
                    else json.loads(out.read_text(encoding="utf-8"))
    assert results["once", "pair"]["dice"] < 1 and results["once", "evaluate"]["dice"] < 1
    assert all(results["once", name] == results["each", name] for name in runs)

def sparse_seg_of_an_uneven_series(tmp_path, uid: str = "1.2.3.4.5"):
    """An unevenly spaced FLAIR series (slices 0, 5, 10.6, 15, 20, 25.8, 30 mm up) and a third party's SEG of it
    without its empty frames (highdicom's default), tmp_path/rater.dcm, whose lowest frame is slice 2: its frames lie
    on no grid of their own. (folder, series, FLAIR image, the mask, the same mask as a file prediction.nrrd)"""
    image = phantom(spacing=(0.7, 0.9, 5.0))
    folder = write_dicom_series(tmp_path / "flair", image, uid=uid, description="AX T2 FLAIR", number=7,
                                extra=PATIENT, positions=stepped_positions(image, [5.0, 5.6, 4.4, 5.0, 5.8, 4.2]))
    series, _ = io.choose_dicom_series(folder)
    flair = io.read_image(folder, series=series)
    mask = (sitk.GetArrayFromImage(flair) >= LESION).astype(np.uint8)
    mask[:2] = 0
    mask[2] = mask[3]  # frames on slices 2 to 6, the lowest 10.6 mm up
    highdicom_seg(folder, tmp_path / "rater.dcm", {"WMH": mask})
    assert int(pydicom.dcmread(tmp_path / "rater.dcm").NumberOfFrames) == 5
    return folder, series, flair, mask, as_file(mask, flair, tmp_path / "prediction.nrrd")


def test_evaluate_places_such_a_seg_by_its_flair_in_the_picture_and_in_a_cohort(tmp_path, capsys):
    """evaluate --flair FOLDER placed a sparse SEG of an unevenly spaced series by the images it names for the figures,
    but read it again without the series for --qc's picture (refused: "its frames each name the source image"), and
    a cohort's flair column did not reach the masks at all (each such case failed): both read it with the series."""
    folder, _, _, _, prediction = sparse_seg_of_an_uneven_series(tmp_path)
    assert main(["evaluate", "--prediction", str(prediction), "--reference", str(tmp_path / "rater.dcm"), "--flair",
                 str(folder), "--qc", str(tmp_path / "case.png")]) == 0, capsys.readouterr().err
    assert "Dice 1.000" in capsys.readouterr().out and (tmp_path / "case.png").stat().st_size > 0
    (tmp_path / "cases.csv").write_text("case,prediction,reference,flair\nc1,prediction.nrrd,rater.dcm,flair\n",
                                        encoding="utf-8")
    assert main(["evaluate", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out")]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "out" / "qc" / "c1_qc.png").exists()


def test_train_places_such_a_seg_by_its_flair_series(tmp_path):
    """`deepwml train`'s manifest with a FLAIR given as its DICOM folder read the case's sparse SEG of an unevenly
    spaced series without the series, and refused it (the advice named only evaluate and consensus): it is read with
    the series train chose for the FLAIR, each frame on the slice of the image it names."""
    from DeepWMLLib import train

    folder, _, _, mask, _ = sparse_seg_of_an_uneven_series(tmp_path)
    case = train.Case("c1", str(folder), str(tmp_path / "rater.dcm"))
    preprocessing = {"grid_size": [64, 64], "grid_spacing_mm": None}
    skipped = train.prepare_cache([case], {"c1": "val"}, preprocessing, tmp_path / "cache", skip_bad_cases=False)
    assert skipped == []
    labels = np.load(tmp_path / "cache" / "val_labels.npy", mmap_mode="r")
    assert labels.shape[0] == mask.shape[0] and np.count_nonzero(labels.reshape(len(labels), -1).any(1)) == 5


def test_consensus_of_segs_of_two_series_with_the_flair_of_one_refuses_the_other(tmp_path, capsys):
    """Two raters' sparse SEGs of two series of one geometry (say a scan repeated), --flair the first one's: the first
    is placed by the images it names, the second names images the series lacks and is refused, naming it."""
    folder, *_ = sparse_seg_of_an_uneven_series(tmp_path / "a")
    sparse_seg_of_an_uneven_series(tmp_path / "b", uid="1.2.3.4.6")
    pair = ["consensus", str(tmp_path / "a" / "rater.dcm"), str(tmp_path / "b" / "rater.dcm"), "--flair", str(folder)]
    assert main(pair) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'b' / 'rater.dcm'}: the DICOM Segmentation has frames between slices" in err
    assert "which is not in the FLAIR series (5 of its 5 frames name none of its images): a segmentation of another " \
           "series" in err


def test_such_a_seg_with_a_flair_folder_whose_series_cannot_be_told_says_what_is_wrong_with_the_folder(tmp_path,
                                                                                                        capsys):
    """--flair FOLDER holding two FLAIR-like series: the SEG was refused saying to give the FLAIR's DICOM series with
    it, which the user had; now the folder's fault is said (two look like a FLAIR), which is what to mend."""
    folder, _, flair, _, prediction = sparse_seg_of_an_uneven_series(tmp_path)
    write_dicom_series(folder, sitk.Cast(flair, sitk.sitkInt16), uid="1.2.3.4.9", description="COR FLAIR", number=8,
                       extra=PATIENT, prefix="cor")
    assert main(["evaluate", "--prediction", str(prediction), "--reference", str(tmp_path / "rater.dcm"), "--flair",
                 str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"{folder} holds 2 DICOM series" in err and "give the FLAIR's DICOM series" not in err, err
