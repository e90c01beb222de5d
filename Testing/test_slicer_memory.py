"""The Slicer module's memory on a large volume, on real MRML nodes (slicer-core): each step holds the copies it
must and no more. Measured as the process's peak resident memory (VmHWM, reset before each step): what VTK and
SimpleITK hold is invisible to tracemalloc. The figures of a 512 x 512 x 200 scan are in the commits that made them."""

from __future__ import annotations

import hashlib
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

from slicer_fixtures import onnxCache, scene  # noqa: E402,F401 (fixtures)

from conftest import process_status as _status, resident_peak  # noqa: E402

from DeepWMLLib import segment  # noqa: E402
from DeepWMLSlicerLib import CoreLogic  # noqa: E402
from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402

SHAPE = (160, 480, 480)  # numpy (k, j, i): a byte a voxel is over 32 MiB, which the allocator always maps afresh and gives
# back when freed (smaller buffers it may reuse unseen)
SPACING = (0.45, 0.45, 0.9)

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")


def _peak(function, *args):
    """(result, the most memory the process held at once during the call beyond what it held before, in bytes a
    voxel of SHAPE)."""
    result, grown = resident_peak(function, *args)
    return result, grown / np.prod(SHAPE)


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return image


def _lesions() -> np.ndarray:
    """Lesions in a part of the volume, as in a scan (Slicer holds a segment cropped to its extent)."""
    mask = np.zeros(SHAPE, np.uint8)
    k, j, i = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    for centre, radius in (((60, 120, 150), 12), ((90, 180, 230), 20), ((75, 140, 260), 4)):
        mask[(k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius ** 2] = 1
    mask[80, 150, 200] = 1
    return mask


@pytest.fixture
def volume(scene):
    return mrml.volumeFromImage(_image(np.zeros(SHAPE, np.int16)), "FLAIR")


def test_a_segment_is_exported_onto_the_volume_with_no_copy_beyond_the_exporters(volume):
    """maskFromSegmentation (every statistic, Dice and rerun check takes its masks so) copied Slicer's exported
    labelmap (two bytes a voxel) into SimpleITK, thresholded it into a mask and cast that into another: 6 bytes a
    voxel at its peak, 300 MiB at 512 x 512 x 200. Now the mask is made from the labelmap's voxels where they lie,
    after Slicer's exporter (whose own peak is 4 bytes a voxel) is done: the same mask."""
    lesions = _lesions()
    segmentation = mrml.segmentationFromMask(_image(lesions), volume, None, name="WMH")
    mask, peak = _peak(mrml.maskFromSegmentation, segmentation, volume)
    assert np.array_equal(sitk.GetArrayViewFromImage(mask), lesions)
    assert mask.GetPixelID() == sitk.sitkUInt8 and mask.GetSpacing() == pytest.approx(SPACING)
    assert peak < 5, f"{peak:.2f} bytes a voxel"


def test_a_mask_is_put_into_a_segmentation_from_its_voxels_where_they_lie(volume):
    """segmentationFromMask (the result of every run, each change segment) thresholded the mask into a second image,
    cast that into a third and copied it to numpy before Slicer's labelmap was made: 3 bytes a voxel, 153 MiB at
    512 x 512 x 200. Now the labelmap's bytes are made from the mask where it lies: the same segment, voxel for
    voxel."""
    lesions = _lesions()
    segmentation, peak = _peak(mrml.segmentationFromMask, _image(lesions), volume, None, "WMH")
    assert peak < 2.5, f"{peak:.2f} bytes a voxel"  # the labelmap's bytes and the mask they are made from
    assert np.array_equal(sitk.GetArrayViewFromImage(mrml.maskFromSegmentation(segmentation, volume)), lesions)


def test_a_finished_run_holds_only_what_goes_into_the_scene(volume, monkeypatch):
    """A run in a thread kept segment_image's whole result, the probability map and the brain mask included (5 bytes
    a voxel), and the copy of the scan it segmented, until the job was let go: through finishSegmentation and, in
    the GUI, the lesion statistics shown after it (a worker process's job hands back the mask, ventricles and report
    alone). The same segmentation."""
    lesions = _lesions()

    def segment_image(image, models=None, progress=None, cancel=None, **options):
        probabilities = _image(lesions.astype(np.float32))
        probabilities.CopyInformation(image)
        mask, brain = sitk.Cast(probabilities > 0.5, sitk.sitkUInt8), sitk.Cast(probabilities >= 0, sitk.sitkUInt8)
        return segment.SegmentationResult(mask, probabilities, {"model": ["stand-in.pt"]}, brain, None)

    monkeypatch.setattr(segment, "segment_image", segment_image)
    monkeypatch.setattr(segment, "load_models", lambda paths: [])
    before = _status("VmRSS")
    job = CoreLogic.SegmentationJob(volume, mrml.imageFromVolume(volume), None, "cpu", location=False)
    job.run()
    held = (_status("VmRSS") - before) / np.prod(SHAPE)
    assert job.error is None
    assert held < 2, f"{held:.2f} bytes a voxel held"  # the mask: a byte a voxel
    segmentation = CoreLogic.DeepWMLCoreLogic().finishSegmentation(job)
    assert np.array_equal(sitk.GetArrayViewFromImage(mrml.maskFromSegmentation(segmentation, volume)), lesions)


def test_the_rerun_check_fingerprints_the_segment_without_a_copy_of_it(volume, monkeypatch):
    """The fingerprint of a segment (the check before a rerun replaces it) hashed a copy of its mask's bytes; now
    the voxels where they lie: the same fingerprint, so a result DeepWML wrote still reads as unedited."""
    lesions = _lesions()
    logic = CoreLogic.DeepWMLCoreLogic()
    segmentation = mrml.segmentationFromMask(_image(lesions), volume, None, name="WMH")
    written = CoreLogic._segmentDigest(segmentation, volume, "WMH")
    segmentation.SetAttribute(CoreLogic.DIGEST_ATTRIBUTES["WMH"], written)
    exported = mrml.maskFromSegmentation(segmentation, volume)
    before = hashlib.sha256(lesions.tobytes())  # as a scene saved before has it
    before.update(repr(exported.GetSize()).encode())
    assert written == before.hexdigest()[:24]
    monkeypatch.setattr(mrml, "maskFromSegmentation", lambda *args: exported)  # the export's own memory aside
    tracemalloc.start()
    try:
        assert logic.rerunLoses(segmentation, volume) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.1 * lesions.size, f"{peak / lesions.size:.2f} bytes a voxel"


def test_a_run_in_a_worker_process_leaves_no_copy_of_the_scan_in_slicer(volume, tmp_path):
    """A run in a worker process (the GUI's) kept the copy of the scan it handed to the process, in Slicer, through
    the run and the finishing (8 bytes a voxel for a float64 volume)."""
    from test_slicer_worker_process import fakePython, processLogic

    logic = processLogic(fakePython(tmp_path, "#!/bin/sh\nsleep 60\n"))  # a worker still running
    before = _status("VmRSS")
    job = logic.startSegmentation(volume, device="cpu", brainMask=False, location=False)
    try:
        held = (_status("VmRSS") - before) / np.prod(SHAPE)
    finally:
        job.cancel()
    assert held < 1, f"{held:.2f} bytes a voxel held"  # the scan's copy: 2 (int16)


def test_a_job_is_handed_to_a_worker_process_with_one_copy_of_the_scan(volume, tmp_path):
    """The job file (the scan's copy and the options) was pickled into bytes, then written: the scan's copy twice in
    Slicer for a moment (4 bytes a voxel here, int16; 16 for a float64 volume). Pickled into the file as it is
    written: once. The worker gets the same voxels."""
    import pickle

    import slicer
    from test_slicer_worker_process import fakePython, processLogic

    logic = processLogic(fakePython(tmp_path, "#!/bin/sh\nsleep 60\n"))  # a worker still running
    job, peak = _peak(lambda: logic.startSegmentation(volume, device="cpu", brainMask=False, location=False))
    try:
        image = pickle.loads((job._folder / "job.pkl").read_bytes())["image"]
    finally:
        job.cancel()
    assert np.array_equal(sitk.GetArrayViewFromImage(image), slicer.util.arrayFromVolume(volume))
    assert peak < 3, f"{peak:.2f} bytes a voxel"  # the scan's copy: 2


def test_a_worker_process_reads_its_job_with_one_copy_of_the_scan_beside_its_image(tmp_path, monkeypatch):
    """The worker read the job file's bytes, unpickled a copy of the scan's bytes out of them and made its image of
    that copy: the scan three times at once (24 bytes a voxel for a float64 volume, more than its run then holds).
    Unpickled as the file is read: twice for a moment, then the image alone; the same voxels."""
    import pickle

    from DeepWMLLib import worker
    from DeepWMLLib.errors import Cancelled

    expected = (np.arange(np.prod(SHAPE)) % 1000).astype(np.int16).reshape(SHAPE)
    (tmp_path / "job.pkl").write_bytes(pickle.dumps({"image": _image(expected), "model_paths": None, "options": {}},
                                                    protocol=pickle.HIGHEST_PROTOCOL))
    given = []

    def segment_image(image, models=None, **options):
        given.append(image)
        raise Cancelled("the job read: the run is not measured here")

    monkeypatch.setattr(segment, "segment_image", segment_image)
    monkeypatch.setattr(segment, "load_models", lambda paths: [])
    code, peak = _peak(worker.run, tmp_path)
    assert code == 1 and np.array_equal(sitk.GetArrayViewFromImage(given[0]), expected)
    assert peak < 5, f"{peak:.2f} bytes a voxel"  # the image and the bytes it is made from: 4; 6 with their copy


def test_a_labelmap_reference_is_put_on_the_volumes_grid_without_a_copy_of_the_volume(volume):
    """A labelmap volume (a rater's mask, for the Dice readout) was put on the FLAIR's grid by way of a copy of the
    FLAIR's voxels, for their grid alone: 2 bytes a voxel here (int16), 8 for a float64 volume. The same mask, on the
    grid or resampled onto it."""
    lesions = _lesions()
    labelmap = mrml.volumeFromImage(_image(lesions * 3), "rater", "vtkMRMLLabelMapVolumeNode")  # label value 3
    mask, peak = _peak(mrml.maskFromNode, labelmap, volume)
    assert np.array_equal(sitk.GetArrayViewFromImage(mask), lesions)
    assert peak < 2.5, f"{peak:.2f} bytes a voxel"  # the labelmap's voxels above 0, and the mask made of them
    # on another grid (shifted by a third of a voxel, and half as fine across): resampled as onto the FLAIR itself
    other = _image(lesions[:, :, ::2].copy())
    other.SetSpacing((SPACING[0] * 2, SPACING[1], SPACING[2]))
    other.SetOrigin((0.15, 0.0, 0.0))
    shifted = mrml.volumeFromImage(other, "other grid", "vtkMRMLLabelMapVolumeNode")
    expected = sitk.Resample(other, mrml.imageFromVolume(volume), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                             sitk.sitkUInt8)
    resampled = mrml.maskFromNode(shifted, volume)
    assert np.array_equal(sitk.GetArrayViewFromImage(resampled), sitk.GetArrayViewFromImage(expected))
    assert 0 < np.count_nonzero(sitk.GetArrayViewFromImage(resampled)) != np.count_nonzero(lesions)
