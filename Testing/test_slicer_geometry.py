"""MRML <-> SimpleITK conversion on real MRML nodes (slicer-core): RAS/LPS, oblique and permuted
grids, transforms, segmentations on other grids, and .seg.nrrd files both ways."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent / "slicer" / "support"))

import slicer  # noqa: E402
import slicerio  # noqa: E402
import vtk  # noqa: E402
from conftest import make_volume, rotation  # noqa: E402
from DeepWMLLib import io  # noqa: E402
from DeepWMLLib.errors import DeepWMLError  # noqa: E402
from slicer_fixtures import onnxCache, scene  # noqa: E402,F401 (fixtures)

from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402

GRIDS = {
    "identity": dict(direction=None),
    "oblique": dict(direction=rotation(0.25, -0.15, 0.4)),
    # axes stored as (posterior, left, superior) with a flipped left-right axis: an LPS/RAS mix-up
    # or a lost permutation moves the lesion to the other hemisphere or another slice
    "permuted-flipped": dict(direction=np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])),
    "sagittal-thick": dict(direction=np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
                           spacing=(0.9, 0.9, 4.0)),
}


def asymmetricVolume(**geometry):
    """A volume whose lesion sits off-centre in every axis, so any flip or swap shows."""
    return make_volume(blobs=((0.25, 0.7, 0.3, 4.0),), **geometry)


def assertSameGrid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("grid", GRIDS)
def test_volume_file_loads_with_slicers_reader_onto_the_same_lps_grid(scene, tmp_path, grid):
    flair, _ = asymmetricVolume(**GRIDS[grid])
    path = tmp_path / "flair.nrrd"  # NRRD keeps float64 directions, so the comparison can be tight
    sitk.WriteImage(flair, str(path))
    node = mrml.loadVolumeFile(str(path), "flair")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijkToRAS = slicer.util.arrayFromVTKMatrix(matrix)
    np.testing.assert_allclose(ijkToRAS, np.diag([-1.0, -1.0, 1.0, 1.0]) @ io.ijk_to_lps(flair), atol=1e-6)
    image = mrml.imageFromVolume(node)
    assertSameGrid(image, flair)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(flair))


@pytest.mark.parametrize("grid", GRIDS)
def test_mask_survives_segmentation_node_round_trip_exactly(scene, grid):
    flair, truth = asymmetricVolume(**GRIDS[grid])
    volume = mrml.volumeFromImage(flair, "flair")
    segmentation = mrml.segmentationFromMask(truth, volume, name="flair WMH")
    assert segmentation.GetSegmentation().GetNthSegment(0).GetName() == "WMH"
    back = mrml.maskFromSegmentation(segmentation, volume)
    assertSameGrid(back, flair)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(truth))


@pytest.mark.parametrize("grid", ["oblique", "permuted-flipped"])
def test_seg_nrrd_written_by_slicer_reads_back_in_deepwmllib_and_slicerio(scene, tmp_path, grid):
    flair, truth = asymmetricVolume(**GRIDS[grid])
    volume = mrml.volumeFromImage(flair, "flair")
    segmentation = mrml.segmentationFromMask(truth, volume, name="flair WMH")
    path = tmp_path / "flair.seg.nrrd"
    mrml.writeSegmentationFile(segmentation, str(path))

    read = io.read_segmentation(path, "WMH")
    onVolumeGrid = sitk.Resample(read, flair, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(onVolumeGrid), sitk.GetArrayFromImage(truth))
    segments = slicerio.read_segmentation(str(path))["segments"]
    assert [s["name"] for s in segments] == ["WMH"]


def test_seg_nrrd_written_by_deepwmllib_loads_into_slicer_on_the_volume_grid(scene, tmp_path):
    flair, truth = asymmetricVolume(**GRIDS["oblique"])
    volume = mrml.volumeFromImage(flair, "flair")
    path = io.write_segmentation(truth, tmp_path / "cli.seg.nrrd")
    segmentation = mrml.loadSegmentationFile(str(path))
    back = mrml.maskFromSegmentation(segmentation, volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(truth))


def test_empty_mask_gives_an_empty_wmh_segment_that_saves_and_loads(scene, tmp_path):
    flair, truth = asymmetricVolume(**GRIDS["oblique"])
    volume = mrml.volumeFromImage(flair, "flair")
    segmentation = mrml.segmentationFromMask(truth * 0, volume, name="empty")
    assert segmentation.GetSegmentation().GetSegmentIdBySegmentName("WMH")
    mask = mrml.maskFromSegmentation(segmentation, volume)
    assertSameGrid(mask, flair)
    assert sitk.GetArrayFromImage(mask).sum() == 0
    mrml.writeSegmentationFile(segmentation, str(tmp_path / "empty.seg.nrrd"))
    assert sitk.GetArrayFromImage(io.read_segmentation(tmp_path / "empty.seg.nrrd")).sum() == 0


def _labelmapSegmentation(mask: sitk.Image):
    """A segmentation whose internal labelmap keeps the grid of `mask` (not the volume's)."""
    labelmap = mrml.volumeFromImage(mask, "other grid", "vtkMRMLLabelMapVolumeNode")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    return segmentation


@pytest.mark.parametrize("other", ["finer-shifted", "rotated"])
def test_segmentation_on_another_grid_is_resampled_onto_the_volume_grid(scene, other):
    flair = sitk.Image(20, 18, 8, sitk.sitkFloat32)
    flair.SetSpacing((2.0, 2.0, 4.0))
    flair.SetOrigin((-10.0, -12.0, -6.0))
    volume = mrml.volumeFromImage(flair, "coarse")
    array = np.zeros((16, 40, 40), np.uint8)
    array[4:10, 6:14, 10:20] = 1
    mask = sitk.GetImageFromArray(array)
    if other == "finer-shifted":
        mask.SetSpacing((1.0, 1.0, 2.0))
        mask.SetOrigin((-10.5, -12.5, -7.0))
    else:
        mask.SetSpacing((0.7, 0.7, 2.0))
        mask.SetOrigin((-14.0, -4.0, -7.0))
        mask.SetDirection(rotation(0, 0, 0.4).ravel().tolist())
    segmentation = _labelmapSegmentation(mask)
    internal = segmentation.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap")
    assert internal.GetSpacing() != (2.0, 2.0, 4.0)

    onVolume = mrml.maskFromSegmentation(segmentation, volume)
    expected = sitk.Resample(mask, flair, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    assertSameGrid(onVolume, flair)
    assert sitk.GetArrayFromImage(expected).sum() > 20
    np.testing.assert_array_equal(sitk.GetArrayFromImage(onVolume), sitk.GetArrayFromImage(expected))


def test_labelmap_on_another_grid_is_resampled_nearest_neighbour(scene):
    flair, truth = asymmetricVolume(**GRIDS["identity"])
    volume = mrml.volumeFromImage(flair, "flair")
    shifted = sitk.Image(truth)
    shifted.SetOrigin(tuple(np.array(truth.GetOrigin()) + (0.9, 0.0, 0.0)))  # one voxel to patient left
    labelmap = mrml.volumeFromImage(shifted, "manual", "vtkMRMLLabelMapVolumeNode")
    mask = mrml.maskFromNode(labelmap, volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask)[:, :, 1:], sitk.GetArrayFromImage(truth)[:, :, :-1])


def test_volume_under_linear_transform_is_read_as_if_hardened(scene):
    flair, _ = asymmetricVolume(**GRIDS["oblique"])
    volume = mrml.volumeFromImage(flair, "moved")
    hardened = mrml.volumeFromImage(flair, "hardened")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(0.1, 0.2, -0.3)
    matrix[:3, 3] = (12.0, -7.0, 30.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    for node in (volume, hardened):
        node.SetAndObserveTransformNodeID(transform.GetID())
    hardened.HardenTransform()
    assert hardened.GetParentTransformNode() is None
    assertSameGrid(mrml.imageFromVolume(volume), mrml.imageFromVolume(hardened))
    # the node itself keeps its transform and local geometry: inputs are never modified
    assert volume.GetParentTransformNode() is transform
    assert volume.GetOrigin() == pytest.approx(mrml.ijkToRASFromImage(flair)[:3, 3])


def test_non_linear_and_shearing_transforms_are_refused_with_a_way_out(scene):
    flair, _ = asymmetricVolume(**GRIDS["identity"])
    volume = mrml.volumeFromImage(flair, "flair")
    warp = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode")
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point in ((0, 0, 0), (10, 0, 0), (0, 10, 0), (0, 0, 10)):
        source.InsertNextPoint(point)
        target.InsertNextPoint(point[0] + 1, point[1], point[2])
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(DeepWMLError, match="non-linear transform.*[Hh]arden"):
        mrml.imageFromVolume(volume)

    shear = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[0, 1] = 0.3
    shear.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    volume.SetAndObserveTransformNodeID(shear.GetID())
    with pytest.raises(DeepWMLError, match="sheared grid .* under the transform 'LinearTransform'.*harden the transform"):
        mrml.imageFromVolume(volume)


def test_a_volume_on_a_sheared_grid_of_its_own_is_not_said_to_be_under_a_transform(scene):
    """A NRRD whose space directions are not at right angles loads in Slicer as it is: it was refused with "(from its
    parent transform); harden the transform", which it is not under. The message says what the grid is, as deepwml
    segment's does, and what to do for both causes."""
    flair, _ = asymmetricVolume(**GRIDS["identity"])
    volume = mrml.volumeFromImage(flair, "tilted FLAIR")
    ijkToRAS = mrml.worldIJKToRAS(volume)
    ijkToRAS[0, 2] = 1.5  # each slice shifted to the right of the one below: a gantry-tilt-like shear
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRAS))
    assert volume.GetParentTransformNode() is None
    for measure in (lambda: mrml.imageFromVolume(volume), lambda: mrml.sliceCenterRAS(volume, 3)):
        with pytest.raises(DeepWMLError, match=r"^'tilted FLAIR' lies on a sheared grid \(axes not at right angles\); "
                                               "resample it onto a regular grid"):
            measure()


def test_segment_choice_wmh_by_name_else_union_of_all(scene):
    flair, truth = asymmetricVolume(**GRIDS["identity"])
    volume = mrml.volumeFromImage(flair, "flair")
    other = sitk.Image(truth) * 0
    other[1, 1, 1] = 1
    segmentation = mrml.segmentationFromMask(truth, volume, name="two segments")
    mrml.segmentationFromMask(other, volume, segmentation, segmentName="vessel")
    wmh = sitk.GetArrayFromImage(mrml.maskFromSegmentation(segmentation, volume)).sum()
    assert wmh == sitk.GetArrayFromImage(truth).sum()
    assert sitk.GetArrayFromImage(mrml.maskFromSegmentation(segmentation, volume, "vessel")).sum() == 1
    segments = segmentation.GetSegmentation()
    segments.GetSegment(segments.GetSegmentIdBySegmentName("WMH")).SetName("rater 1")
    assert sitk.GetArrayFromImage(mrml.maskFromSegmentation(segmentation, volume)).sum() == wmh + 1
    with pytest.raises(DeepWMLError, match="no segment 'lesion'"):
        mrml.maskFromSegmentation(segmentation, volume, "lesion")


def test_slice_centre_follows_the_axial_axis_of_an_oblique_volume(scene):
    flair, _ = asymmetricVolume(**GRIDS["sagittal-thick"])
    volume = mrml.volumeFromImage(flair, "flair")
    axis = io.axial_axis(flair)
    index = [(n - 1) / 2 for n in flair.GetSize()]
    index[axis] = 3
    l, p, s = flair.TransformContinuousIndexToPhysicalPoint(index)
    np.testing.assert_allclose(mrml.sliceCenterRAS(volume, 3), (-l, -p, s), atol=1e-6)


def test_slices_of_a_volume_stored_in_sagittal_slices_are_numbered_by_its_axial_voxel_axis(scene):
    """README: the module numbers the axial slices by the volume's voxel axis nearest superior, as Slicer holds it:
    the K of the Data Probe for a scan stored in axial slices, the J here (it said K for every volume)."""
    from DeepWMLSlicerLib.CoreLogic import DeepWMLCoreLogic

    flair, truth = asymmetricVolume(**GRIDS["sagittal-thick"])
    volume = mrml.volumeFromImage(flair, "flair")
    report = DeepWMLCoreLogic().lesionStatistics(mrml.segmentationFromMask(truth, volume), volume)
    k, j, i = np.nonzero(sitk.GetArrayFromImage(truth))
    assert [s["index"] for s in report["slices"] if s["area_mm2"] > 0] == sorted(set(j.tolist()))
    assert sorted(set(j.tolist())) != sorted(set(k.tolist()))
