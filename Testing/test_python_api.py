"""README's Python API, as a researcher calls it from a script: what it says each call takes and gives holds."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.segment import SegmentationResult, load_brain_model, load_models, segment_image

from conftest import BRAIN_LABELS, REPO, make_volume, oracle_networks_with_brain, rotation, tiny_model_file

README = (REPO / "README.md").read_text(encoding="utf-8")
SEGMENT_API = README[README.index("Python API: `DeepWMLLib.segment.segment_image("):]
SEGMENT_API = SEGMENT_API[:SEGMENT_API.index("\n\n")]


def test_readme_says_how_to_skip_the_brain_gate_and_the_brain_network():
    """The command line's --no-brain-mask runs the brain network for the checks; README says which argument does
    that in Python (brain_gate=False) and which runs none (brain_model=None), and names every result field."""
    for words in ("`brain_gate=False`", "`--no-brain-mask`", "`brain_model=None`", 'brain_model="default"'):
        assert words in SEGMENT_API
    for field in SegmentationResult.__dataclass_fields__:
        assert f"`.{field}`" in SEGMENT_API


@pytest.fixture
def case(tmp_path, tiny_model, monkeypatch):
    """An oblique scan off the origin, the WMH model, and a brain model that marks the left half of its grid."""
    oracle_networks_with_brain(monkeypatch)
    image, _ = make_volume(size=(64, 48, 8), blobs=((0.3, 0.5, 0.5, 5.0), (0.72, 0.5, 0.5, 5.0)),
                           direction=rotation(0.1, 0.05, 0.2))
    brain = load_brain_model(str(tiny_model_file(tmp_path / "brain.pt", labels=BRAIN_LABELS)))
    return image, load_models([tiny_model]), brain


def test_what_readme_says_of_brain_model_and_brain_gate_is_what_segment_image_does(case):
    image, models, brain = case
    gated = segment_image(image, models, "cpu", brain_model=brain)
    kept = segment_image(image, models, "cpu", brain_model=brain, brain_gate=False)
    none = segment_image(image, models, "cpu", brain_model=None)
    assert gated.report["brain_mask"] == "gates the marks" and gated.report["outside_brain_removed_ml"] > 0
    # brain_gate=False: the marks of no brain network, the brain mask still made for the checks and the volume
    assert np.array_equal(sitk.GetArrayFromImage(kept.mask), sitk.GetArrayFromImage(none.mask))
    assert kept.report["brain_mask"] == "not applied to the marks"
    assert kept.report["intracranial_ml"] == gated.report["intracranial_ml"] > 0 and kept.report["contrast"]
    assert kept.brain is not None
    for key in ("brain_mask", "contrast", "brain_at_fov_edge"):
        assert none.report[key] is None
    assert "intracranial_ml" not in none.report and none.brain is None


def test_outputs_are_of_the_types_readme_gives_on_the_input_s_exact_grid(case):
    image, models, brain = case
    result = segment_image(image, models, "cpu", brain_model=brain)
    types = {"mask": sitk.sitkUInt8, "probabilities": sitk.sitkFloat32, "brain": sitk.sitkUInt8}
    for field, pixel in types.items():
        output = getattr(result, field)
        assert output.GetPixelID() == pixel
        assert (output.GetSize(), output.GetOrigin(), output.GetSpacing(), output.GetDirection()) == \
            (image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    assert set(np.unique(sitk.GetArrayViewFromImage(result.mask))) <= {0, 1}
    volume_ml = np.count_nonzero(sitk.GetArrayViewFromImage(result.mask)) * np.prod(image.GetSpacing()) / 1000
    assert result.report["volume_ml"] == pytest.approx(volume_ml, abs=1e-6)


@pytest.mark.parametrize("given", ["array", "path"])
def test_an_array_or_a_file_name_is_refused_saying_what_to_pass(case, given, tmp_path):
    """A numpy array carries no spacing or orientation (its axis order unknown too): never segmented as some grid."""
    image, models, brain = case
    value = sitk.GetArrayFromImage(image) if given == "array" else str(tmp_path / "flair.nii.gz")
    with pytest.raises(DeepWMLError, match=re.escape("pass a SimpleITK image (e.g. io.read_image(path))")):
        segment_image(value, models, "cpu", brain_model=brain)


def test_an_image_in_memory_of_no_mris_spacing_is_told_to_take_the_scans_own_geometry(case):
    """An image made from an array whose spacing was never set from the scan (or set in metres): the refusal told
    a script's author to copy a file again, of which there is none."""
    image, models, brain = case
    image = sitk.Image(image)
    image.SetSpacing([s / 1000 for s in image.GetSpacing()[:2]] + [1e-5])  # mm written as metres
    with pytest.raises(DeepWMLError, match=re.escape("voxel size is no MRI's")) as refused:
        segment_image(image, models, "cpu", brain_model=brain)
    assert "give it the scan's own origin, spacing and direction" in str(refused.value)
    assert "copy the file again" not in str(refused.value)


@pytest.mark.parametrize("field,value,words", [
    ("origin", (math.nan,) * 3, "its origin is no MRI's (origin (nan, nan, nan) mm"),
    ("origin", (math.inf, 0.0, 0.0), "its origin is no MRI's (origin (inf, 0, 0) mm"),
    ("direction", (math.nan,) + (0.0,) * 8, "its orientation is no MRI's"),
    ("direction", (2.0, 0, 0, 0, 2.0, 0, 0, 0, 2.0), "its direction's axes are of length 2, 2, 2, not 1"),
    ("direction", (0.9, 0, 0, 0, 0.9, 0, 0, 0, 5.0), "its direction's axes are of length 0.9, 0.9, 5, not 1"),
], ids=["origin-nan", "origin-inf", "direction-nan", "direction-scaled-2", "direction-scaled-by-voxel-sizes"])
def test_an_image_in_memory_placed_nowhere_is_refused_naming_what(case, field, value, words):
    """An in-memory image whose origin or direction is not numbers, or whose direction is scaled (by the voxel
    sizes, as a script building it from an affine may do): refused, never segmented on a grid of nonsense. A NaN
    direction was said in broken words ('its axes is no MRI's'), a scaled one called a sheared grid."""
    image, models, brain = case
    image = sitk.Image(image)
    getattr(image, f"Set{field.capitalize()}")(value)
    with pytest.raises(DeepWMLError, match=re.escape(words)) as refused:
        segment_image(image, models, "cpu", brain_model=brain)
    assert "sheared" not in str(refused.value) and "copy the file again" not in str(refused.value)


def test_segment_cases_and_segment_case_take_one_scan_as_str_or_path(tmp_path, tiny_model, monkeypatch):
    """segment_cases("scan.nii.gz", out) read the name letter by letter, its first "/" the root folder: it searched
    the whole disk for scans. One scan given alone is that scan; segment_case takes str as well as Path (it failed
    joining a str OUTDIR: TypeError)."""
    import DeepWMLLib.segment as segment

    oracle_networks_with_brain(monkeypatch)
    image, _ = make_volume(size=(64, 48, 8), blobs=((0.3, 0.5, 0.5, 5.0),))
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(image, str(scan))
    expand = segment.expand_inputs

    def only_whole_paths(inputs):
        assert all(len(str(raw)) > 1 for raw in inputs), "a scan's name read letter by letter"  # never walk "/"
        return expand(inputs)

    monkeypatch.setattr(segment, "expand_inputs", only_whole_paths)
    for given in (str(scan), scan):
        rows = segment.segment_cases(given, tmp_path / f"out_{type(given).__name__}", [str(tiny_model)], "cpu",
                                     brain_model=None)
        assert [(row["case"], row["status"]) for row in rows] == [("scan", "ok")]
    (tmp_path / "one").mkdir()
    row = segment.segment_case("scan", str(scan), str(tmp_path / "one"), load_models([tiny_model]), "cpu",
                               brain_model=None)
    assert row["status"] == "ok" and (tmp_path / "one" / "scan_wmh.nii.gz").is_file()


def test_a_mask_made_of_an_array_with_its_axes_swapped_is_refused_not_compared(tmp_path):
    """A prediction made of an (x, y, z) array (nibabel's order) with sitk.GetImageFromArray, which takes (z, y, x),
    and the reference's spacing set on it: on the reference's lattice with its sizes in another order, it was padded
    onto the reference's grid as a crop and scored (Dice 0.05 against the very same lesion), in evaluate_case,
    consensus_check and lesion_change alike. Refused, saying how to give the array."""
    from DeepWMLLib import change, consensus, evaluation, io

    lesion = np.zeros((10, 20, 20), np.uint8)  # z, y, x
    lesion[3:6, 5:10, 5:10] = 1
    reference = sitk.GetImageFromArray(lesion)
    reference.SetSpacing((1.0, 1.0, 3.0))
    swapped = sitk.GetImageFromArray(np.ascontiguousarray(lesion.transpose()))  # an (x, y, z) array given as is
    swapped.SetSpacing(reference.GetSpacing())
    hint = re.escape("the axes of an array swapped? SimpleITK's GetImageFromArray takes a (z, y, x) array")
    with pytest.raises(DeepWMLError, match=hint):
        evaluation.evaluate_case(swapped, reference)
    with pytest.raises(DeepWMLError, match=hint):
        consensus.consensus_check(swapped, reference)
    with pytest.raises(DeepWMLError, match=hint):
        io.onto_grid(swapped, reference, "the follow-up mask", "the follow-up FLAIR")
    noise = np.random.default_rng(0).normal(100, 10, lesion.shape).astype(np.float32)
    flair = sitk.GetImageFromArray(noise + 50 * lesion)
    flair.CopyInformation(reference)
    with pytest.raises(DeepWMLError, match=hint):
        change.lesion_change(flair, flair, reference, swapped, check=False)
    # the array transposed back, as the message says, is the reference itself
    right = sitk.GetImageFromArray(sitk.GetArrayFromImage(swapped).transpose())
    right.SetSpacing(reference.GetSpacing())
    assert evaluation.evaluate_case(right, reference)["dice"] == 1.0


def test_load_models_takes_a_shipped_model_or_ensemble_by_name_as_model_does():
    """`--model unet32-v9` is the shipped model, but load_models("unet32-v9") (and segment_image(models=...)) said
    'model file unet32-v9 does not exist'. A name gives its file(s); one that is none says which names there are."""
    from DeepWMLLib.segment import loaded_models, model_files

    assert "`\"unet32-v9\"`, `\"ensemble-v8\"`" in SEGMENT_API
    for name in ("unet32-v9", "ensemble-v8"):
        files = model_files([name])
        assert [m.path for m in load_models(name)] == files == [m.path for m in loaded_models([name])]
    assert len(model_files(["ensemble-v8"])) > 1
    with pytest.raises(DeepWMLError, match="no such model file, nor a shipped model or ensemble of that name "
                                           r"\(shipped: unet32-v9, "):
        load_models(["unet32-v0"])
