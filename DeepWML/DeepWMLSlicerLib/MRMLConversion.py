"""MRML nodes <-> SimpleITK images with exact geometry, and the few scene helpers the module needs.

Slicer stores a volume's geometry as IJKToRAS; SimpleITK and DeepWMLLib use LPS:
IJKToRAS = diag(-1, -1, 1, 1) @ IJKToLPS. Voxel arrays need no reordering: `arrayFromVolume` and
`sitk.GetArrayFromImage` both index (k, j, i).

A volume under a linear parent transform is converted as if the transform were hardened (its world
geometry; the node itself is left alone), so results line up with what the slice views show. A
non-linear transform, or one that shears or scales axes unevenly, cannot be represented on a voxel
grid and is refused with a message that says to harden and resample first.

Segmentations are read through Slicer's own exporter (`ExportSegmentsToLabelmapNode` onto the
reference volume), which resamples whatever internal labelmap grid and transform the segmentation
has onto the volume's voxel grid; labelmap volumes on another grid are resampled with SimpleITK,
nearest neighbour.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk

import slicer
from DeepWMLLib.errors import DeepWMLError
from DeepWMLLib.io import (BASELINE_CALLS, CHANGE_MAP_LABELS, FOLLOWUP_CALLS, VENTRICLE_SEGMENT, axial_axis,
                           grid_difference, ijk_to_lps, is_change_segmentation, read_any)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
WMH_SEGMENT_NAME = "WMH"
WMH_COLOR = (1.0, 0.9, 0.0)
VENTRICLE_SEGMENT_NAME = VENTRICLE_SEGMENT  # added by DeepWML for the periventricular/deep split (hidden)
VENTRICLE_COLOR = (0.35, 0.65, 1.0)
CHANGE_ATTRIBUTE = "DeepWML.changeOf"  # on a change segmentation the module made: the ID of its follow-up volume
SOURCE_VOLUME_ROLE = "DeepWMLSourceVolume"  # node reference of a DeepWML segmentation to the volume it was made from
_ORTHONORMAL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Volumes


def _ownIJKToRAS(volumeNode) -> np.ndarray:
    """The 4x4 IJK -> RAS matrix of a volume in its own coordinates (its parent transforms not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def worldIJKToRAS(volumeNode) -> np.ndarray:
    """The 4x4 IJK -> world RAS matrix of a volume, its linear parent transforms applied."""
    ijkToRAS = _ownIJKToRAS(volumeNode)
    transformNode = volumeNode.GetParentTransformNode()
    if transformNode is None:
        return ijkToRAS
    if not transformNode.IsTransformToWorldLinear():
        raise DeepWMLError(
            f"'{volumeNode.GetName()}' is under the non-linear transform '{transformNode.GetName()}'; "
            "harden the transform (Data module: right-click the volume, Harden transform) and try again"
        )
    toWorld = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(toWorld)
    return slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToRAS


def _setGeometry(image: sitk.Image, ijkToLPS: np.ndarray, name: str, transformNode=None) -> sitk.Image:
    """`image` placed by `ijkToLPS`, that of the volume `name` (under `transformNode` when that was applied)."""
    spacing = np.linalg.norm(ijkToLPS[:3, :3], axis=0)
    if not np.all(spacing > 0):
        raise DeepWMLError(f"'{name}' has a zero voxel spacing; fix its geometry (Volumes module, Volume information)")
    direction = ijkToLPS[:3, :3] / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > _ORTHONORMAL_TOL:
        if transformNode is None:
            raise DeepWMLError(f"'{name}' lies on a sheared grid (axes not at right angles); resample it onto a regular "
                               "grid (Resample Scalar/Vector/DWI Volume) first")
        raise DeepWMLError(
            f"'{name}' lies on a sheared grid (axes not at right angles) under the transform '{transformNode.GetName()}', "
            "which may shear or scale it unevenly; harden the transform and resample the volume onto a regular grid "
            "(Resample Scalar/Vector/DWI Volume) first"
        )
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(ijkToLPS[:3, 3].tolist())
    return image


def _checkVoxels(volumeNode) -> None:
    if volumeNode is None:
        raise DeepWMLError("no volume selected; choose the FLAIR volume first")
    imageData = volumeNode.GetImageData() if volumeNode.IsA("vtkMRMLScalarVolumeNode") else None
    if imageData is None or imageData.GetPointData().GetScalars() is None:  # none loaded, or an empty crop
        raise DeepWMLError(f"'{volumeNode.GetName()}' is not a scalar volume with voxels; choose a loaded FLAIR volume")


def worldGeometry(volumeNode) -> sitk.Image:
    """A one-voxel image with the volume's world LPS spacing, direction and origin, without copying its voxels. It
    checks, naming the volume, that there is a grid to measure on: voxels, and no non-linear or shearing transform
    (Slicer's exporter would put a segmentation on a made-up grid, or DeepWML's temporary node be named instead)."""
    _checkVoxels(volumeNode)
    return _geometry(volumeNode, world=True)


def _geometry(volumeNode, world: bool) -> sitk.Image:
    """A one-voxel image placed as the volume's voxels: in world LPS, or with `world` False in the node's own
    coordinates (its parent transforms, which may be non-linear, not applied)."""
    probe = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    if not world:
        return _setGeometry(probe, LPS_TO_RAS @ _ownIJKToRAS(volumeNode), volumeNode.GetName())
    return _setGeometry(probe, LPS_TO_RAS @ worldIJKToRAS(volumeNode), volumeNode.GetName(),
                        volumeNode.GetParentTransformNode())


def _placed(image: sitk.Image, probe: sitk.Image) -> sitk.Image:
    """`image` put where the one-voxel `probe` (`_geometry`) is."""
    image.SetSpacing(probe.GetSpacing())
    image.SetDirection(probe.GetDirection())
    image.SetOrigin(probe.GetOrigin())
    return image


def _voxels(volumeNode) -> np.ndarray:
    """A scalar volume node's voxels as a numpy (k, j, i) array: the node's own memory, not a copy."""
    _checkVoxels(volumeNode)
    name = volumeNode.GetName()
    values = volumeNode.GetImageData().GetNumberOfScalarComponents()
    if values != 1:  # Slicer's MultiVolume holds a 4D series' frames as a voxel's values
        raise DeepWMLError(f"'{name}' has {values} values per voxel (an RGB image, or a 4D series such as a "
                           "multi-volume); DeepWML needs a grey-scale FLAIR volume: load the FLAIR, or make one of its "
                           "frames a scalar volume (Multi-volume Explorer, or Sequences)")
    array = slicer.util.arrayFromVolume(volumeNode)
    if array.ndim != 3 or min(array.shape) < 1:
        raise DeepWMLError(f"'{name}' is not a 3D volume (array shape {array.shape})")
    return array


def imageFromVolume(volumeNode, world: bool = True) -> sitk.Image:
    """A scalar volume node as a SimpleITK image in world LPS (a copy: the node is never modified); with `world`
    False, in the node's own coordinates (its parent transforms, which may be non-linear, not applied)."""
    array = _voxels(volumeNode)
    probe = _geometry(volumeNode, world)
    return _placed(sitk.GetImageFromArray(array), probe)  # copies the voxels


def onOwnGrid(image: sitk.Image, volumeNode) -> sitk.Image:
    """`image`, on the volume's voxels (e.g. a mask exported onto it), placed where the volume's own coordinates put
    them (its parent transforms not applied): for a volume loaded from DICOM, where its series' header places them."""
    return _placed(image, _geometry(volumeNode, world=False))


def _maskFromVolume(volumeNode, world: bool = True) -> sitk.Image:
    """A volume node's non-zero voxels as a uint8 0/1 image (`imageFromVolume`'s geometry), thresholded where the
    voxels lie: no copy of them (a labelmap's are two bytes a voxel), and one mask, not a second one cast to bytes.
    Of `deepwml change`'s label map loaded as a labelmap (`changeLabelmap`) the follow-up's lesions, gone ones left out."""
    change = changeLabelmap(volumeNode)
    voxels = _voxels(volumeNode)
    lesion = np.isin(voxels, change[1]) if change else voxels > 0
    return _maskImage(lesion, _geometry(volumeNode, world))


def changeLabelmap(volumeNode) -> tuple[str, list[int], list[str], list[str]] | None:
    """(what shows it, the follow-up's values, their calls, the gone calls present) where a labelmap volume is
    `deepwml change`'s label map (CASE_change.nii.gz, .nrrd, .mha) loaded from its file, as the command line knows
    it (io.change_map_calls: its file's header, else its report beside it holding these very voxels) and holding
    calls only; else None."""
    if volumeNode is None or not volumeNode.IsA("vtkMRMLLabelMapVolumeNode") or volumeNode.GetImageData() is None:
        return None
    storage = volumeNode.GetStorageNode()
    path = storage.GetFileName() if storage is not None else None
    if not path:
        return None
    from DeepWMLLib.io import CHANGE_MAP_NOTES, change_map_calls, change_report_path, file_notes

    if file_notes(path) != CHANGE_MAP_NOTES and change_report_path(path) is None:
        return None  # (its voxels not looked at)
    voxels = _voxels(volumeNode)
    if voxels.min() < 0 or voxels.max() > max(CHANGE_MAP_LABELS):
        return None
    labels = voxels.astype(np.uint8)
    values = np.unique(labels)
    found = change_map_calls(path, sitk.GetImageFromArray(labels))
    if found is None:
        return None
    why, calls = found
    present = [int(v) for v in values if v]
    gone = [calls[v] for v in present if calls[v] in BASELINE_CALLS]
    followup = [v for v, name in calls.items() if name in FOLLOWUP_CALLS]
    return why, followup, [calls[v] for v in present if v in followup], gone


def _maskImage(voxels: np.ndarray, probe: sitk.Image) -> sitk.Image:
    """A bool (k, j, i) array as a uint8 0/1 image placed as `probe`."""
    return _placed(sitk.GetImageFromArray(voxels.view(np.uint8)), probe)


def ijkToRASFromImage(image: sitk.Image) -> np.ndarray:
    return LPS_TO_RAS @ ijk_to_lps(image)


def volumeFromImage(image: sitk.Image, name: str, className: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in the scene holding a copy of `image` with its geometry."""
    return _volumeFromArray(sitk.GetArrayViewFromImage(image), image, name, className)


def _volumeFromArray(array: np.ndarray, image: sitk.Image, name: str, className: str):
    """A new volume node in the scene holding a copy of the (k, j, i) `array`, placed as `image`."""
    node = slicer.mrmlScene.AddNewNodeByClass(className, name)
    slicer.util.updateVolumeFromArray(node, array)  # copies the voxels into the node
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRASFromImage(image)))
    return node


def freeNodeName(base: str) -> str:
    """`base`, else `base_1`, `base_2`...: the first name no node in the scene has. (The scene's own
    GenerateUniqueName counts on from every name it ever gave, taken or not, removed or not: a result
    kept beside another after a few reruns became '<base>_3', and one made after the only one was deleted
    '<base>_1' or more.)"""
    name, number = base, 0
    while slicer.mrmlScene.GetFirstNodeByName(name) is not None:
        number += 1
        name = f"{base}_{number}"
    return name


def removeNode(node) -> None:
    """Remove a node together with its display and storage nodes."""
    if node is None or node.GetScene() is None:
        return
    scene = node.GetScene()
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
        if node.IsA("vtkMRMLDisplayableNode") else []
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            scene.RemoveNode(helper)


# ---------------------------------------------------------------------------------------------
# Segmentations


def segmentIds(segmentationNode, segmentId: str | None = None) -> list[str]:
    """The segments that make up the lesion mask.

    `segmentId` (an ID or a name) picks one; otherwise the segment named WMH, otherwise the union of
    all segments, which suits a rater's manual segmentation with one segment of any name (DeepWML's
    'Lateral ventricles' segment never counts as lesion). A name stands for every segment of that name (a
    rater's two 'WMH'), as the command line reads a .seg.nrrd. Of a lesion change segmentation (`changeSegmentation`:
    the module's, or its change SEG or CASE_change.seg.nrrd loaded back) the follow-up's lesions: every segment but
    the gone ones (baseline lesions no longer there), as the command line reads them; [] where every segment is a
    gone one (an empty mask).
    """
    segmentation = segmentationNode.GetSegmentation()
    name = segmentationNode.GetName()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise DeepWMLError(f"segmentation '{name}' has no segments")
    if segmentId is not None:
        if segmentation.GetSegment(segmentId) is not None:
            return [segmentId]
        byName = _named(segmentation, ids, segmentId)
        if byName:
            return byName
        names = [segmentation.GetSegment(i).GetName() for i in ids]
        raise DeepWMLError(f"segmentation '{name}' has no segment '{segmentId}' (it has {names})")
    wmh = _named(segmentation, ids, WMH_SEGMENT_NAME)
    if wmh:
        return wmh
    lesions = [i for i in ids if segmentation.GetSegment(i).GetName() != VENTRICLE_SEGMENT_NAME]
    if changeSegmentation(segmentationNode):  # the follow-up's calls: its gone ones left out
        return [i for i in lesions if segmentation.GetSegment(i).GetName() not in BASELINE_CALLS]
    if not lesions:
        raise DeepWMLError(f"segmentation '{name}' has no lesion segment (only '{VENTRICLE_SEGMENT_NAME}')")
    return lesions


def changeSegmentation(segmentationNode) -> str:
    """Why a segmentation is a lesion change segmentation ("" where it is not): marked by the module's Lesion change
    (CHANGE_ATTRIBUTE), or, loaded back from DeepWML's change SEG or CASE_change.seg.nrrd (which carry no mark into
    Slicer), every segment named as DeepWML names the change calls (FOLLOWUP_CALLS, BASELINE_CALLS; the .seg.nrrd's
    every call, the SEG's those present), with a gone one among them or several: a rater's one segment named 'new'
    is lesion either way."""
    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        return ""
    if segmentationNode.GetAttribute(CHANGE_ATTRIBUTE):
        return "made by Lesion change"
    segmentation = segmentationNode.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    if is_change_segmentation(names):
        return "its segments are named as DeepWML names the change calls"
    return ""


def _named(segmentation, ids: list[str], segmentName: str) -> list[str]:
    """The IDs among `ids` of the segments named `segmentName`, in any letter case as GetSegmentIdBySegmentName
    finds them (which gives the first alone)."""
    return [i for i in ids if segmentation.GetSegment(i).GetName().lower() == segmentName.lower()]


def _stringArray(values) -> vtk.vtkStringArray:
    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def maskFromSegmentation(segmentationNode, referenceVolumeNode, segmentId: str | None = None) -> sitk.Image:
    """The segment(s) as a uint8 0/1 image on the reference volume's grid (world LPS)."""
    if referenceVolumeNode is None:
        raise DeepWMLError(f"choose the volume that '{segmentationNode.GetName()}' belongs to")
    worldGeometry(referenceVolumeNode)  # refused by its own name, before the exporter makes up a grid or names its node
    return _exportSegments(segmentationNode, segmentIds(segmentationNode, segmentId), referenceVolumeNode)


def _exportSegments(segmentationNode, ids: list[str], referenceVolumeNode) -> sitk.Image:
    """Segments as a uint8 0/1 image: on the reference volume's grid (world LPS), or with None on the
    segmentation's own labelmap grid, cropped to the segments (nothing of them cut off), in the segmentation's own
    coordinates (LPS; its parent transform not applied: a non-linear one would not leave a voxel grid)."""
    if not ids:  # (the exporter takes no segment for every segment) a change segmentation whose every call is gone
        if referenceVolumeNode is None:
            return sitk.Image(1, 1, 1, sitk.sitkUInt8)
        return _maskImage(np.zeros(_voxels(referenceVolumeNode).shape, bool), _geometry(referenceVolumeNode, world=True))
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DeepWML export")
    labelmap.SetHideFromEditors(True)
    colorsBefore = {node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLColorNode")}
    try:
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, _stringArray(ids), labelmap, referenceVolumeNode)
        if not exported or labelmap.GetImageData() is None:
            raise DeepWMLError(
                f"segmentation '{segmentationNode.GetName()}' cannot be exported"
                + (f" onto '{referenceVolumeNode.GetName()}'" if referenceVolumeNode is not None else "") + "; "
                "check that it has a binary labelmap representation"
            )
        # The exporter puts the labelmap on the reference's own IJK grid and under its transform (without a
        # reference: on the segmentation's labelmap grid, under the segmentation's transform).
        if labelmap.GetImageData().GetPointData().GetScalars() is None:  # no reference, empty segments: no extent
            return sitk.Image(1, 1, 1, sitk.sitkUInt8)
        voxels = _voxels(labelmap) > 0
        probe = _geometry(labelmap, world=referenceVolumeNode is not None)
    finally:
        # without a colour table the exporter adds a new one ("<segmentation>_ColorTable") to the scene
        display = labelmap.GetDisplayNode()
        colors = display.GetColorNode() if display is not None else None
        removeNode(labelmap)
        if colors is not None and colors.GetID() not in colorsBefore:
            removeNode(colors)
    # the exported labelmap (two bytes a voxel) is let go before the mask is made from its voxels
    labelmap = display = None
    return _maskImage(voxels, probe)


def maskFromLabelmap(labelmapNode, referenceVolumeNode) -> sitk.Image:
    """A labelmap volume's non-zero voxels as a uint8 0/1 image on the reference volume's grid."""
    mask = _maskFromVolume(labelmapNode)
    # the reference's grid without a copy of its voxels (a float64 FLAIR's: 8 bytes a voxel)
    size = _voxels(referenceVolumeNode).shape[::-1]
    reference = _geometry(referenceVolumeNode, world=True)
    if mask.GetSize() == size and grid_difference(_geometry(labelmapNode, world=True), reference) is None:
        return _placed(mask, reference)
    return sitk.Resample(mask, size, sitk.Transform(), sitk.sitkNearestNeighbor, reference.GetOrigin(),
                         reference.GetSpacing(), reference.GetDirection(), 0, sitk.sitkUInt8)


def maskFromNode(node, referenceVolumeNode, segmentId: str | None = None) -> sitk.Image:
    """A lesion mask from a segmentation node or a labelmap volume node, on the reference grid."""
    if node is None:
        raise DeepWMLError("no segmentation selected")
    if node.IsA("vtkMRMLSegmentationNode"):
        return maskFromSegmentation(node, referenceVolumeNode, segmentId)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return maskFromLabelmap(node, referenceVolumeNode)
    raise DeepWMLError(f"'{node.GetName()}' is neither a segmentation nor a labelmap volume")


def maskNotes(node, segmentId: str | None = None) -> list[str]:
    """What of `node` the lesion mask was made from, where a reader could think otherwise (for the result
    panels): a segment named WMH taken and other segments left out, several segments joined, several label
    values joined. Nothing for one segment or one label value, or for DeepWML's own WMH and ventricles."""
    if node is None or segmentId is not None:  # an explicit choice
        return []
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        if node.GetImageData() is None:
            return []
        change = changeLabelmap(node)
        if change:
            why, _, counted, gone = change
            return [f"'{name}' is DeepWML's lesion change label map ({why}): the follow-up's lesions were counted "
                    f"({', '.join(counted) or 'none'}); {', '.join(gone) or 'no gone label'} left out (baseline "
                    "lesions no longer there)"]
        array = slicer.util.arrayFromVolume(node)
        values = np.unique(array[array != 0])
        if len(values) < 2:
            return []
        shown = ", ".join(f"{value:g}" for value in values[:10].tolist()) + (", ..." if len(values) > 10 else "")
        return [f"labelmap '{name}' has the labels {shown}: all were counted as lesion, together"]
    if not node.IsA("vtkMRMLSegmentationNode"):
        return []
    segmentation = node.GetSegmentation()
    taken = segmentIds(node)
    names = [segmentation.GetSegment(i).GetName() for i in taken]
    others = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())
              if segmentation.GetNthSegmentID(i) not in taken
              and segmentation.GetNthSegment(i).GetName() != VENTRICLE_SEGMENT_NAME]
    why = changeSegmentation(node)
    if why and not _named(segmentation, taken, WMH_SEGMENT_NAME):
        return [f"'{name}' is DeepWML's lesion change segmentation ({why}): the follow-up's lesions were counted "
                f"({', '.join(dict.fromkeys(names)) or 'none'}); {', '.join(dict.fromkeys(others)) or 'no gone segment'} "
                "left out (baseline lesions no longer there)"]
    if len(taken) > 1 and _named(segmentation, taken, WMH_SEGMENT_NAME):  # a rater's two WMH: by their name
        named = " / ".join(repr(n) for n in dict.fromkeys(names))
        if others:
            return [f"of '{name}', only the {len(taken)} segments named {named} were counted as lesion (together), "
                    f"not {', '.join(repr(n) for n in others)}; to count them too, add them to {named} (Segment "
                    "Editor)"]
        return [f"'{name}' has {len(taken)} segments named {named}: {'both' if len(taken) == 2 else 'all'} were "
                f"counted as lesion, together; to count one alone, rename the {'other' if len(taken) == 2 else 'others'}"
                " (Segment Editor)"]
    if len(taken) > 1:
        return [f"'{name}' has {len(taken)} segments ({', '.join(repr(n) for n in names)}): all were counted as "
                f"lesion, together; to count one alone, name it {WMH_SEGMENT_NAME} (Segment Editor)"]
    if others:
        return [f"of '{name}', only the segment '{names[0]}' was counted as lesion, not "
                f"{', '.join(repr(n) for n in others)}; to count them too, add them to '{names[0]}' (Segment Editor)"]
    return []


def drawnOnNote(node, volumeNode) -> list[str]:
    """A note when a segmentation was drawn on another volume than the one it is measured on."""
    drawnOn = referenceVolumeOf(node)
    if drawnOn is None or volumeNode is None or drawnOn is volumeNode:
        return []
    return [f"'{node.GetName()}' was drawn on '{drawnOn.GetName()}', not on '{volumeNode.GetName()}': check that it "
            f"is that scan's segmentation"]


def ownMask(node, segmentId: str | None = None) -> sitk.Image:
    """A segmentation's or labelmap volume's lesion mask (as `maskFromNode` takes it) on its own grid, in the node's
    own coordinates (LPS; `toWorldRAS` applies its transforms): a segmentation's on its internal labelmap grid, a
    labelmap volume's on its voxels; nothing resampled."""
    if node.IsA("vtkMRMLSegmentationNode"):
        return _exportSegments(node, segmentIds(node, segmentId), None)
    return _maskFromVolume(node, world=False)


def toWorldRAS(node, points: np.ndarray) -> np.ndarray:
    """RAS points (3 x N) in a node's own coordinates moved to world RAS through its parent transforms, linear or
    not, as the views show the node."""
    transformNode = node.GetParentTransformNode()
    if transformNode is None or points.shape[1] == 0:
        return points
    from vtk.util import numpy_support

    toWorld = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(transformNode, None, toWorld)
    own, world = vtk.vtkPoints(), vtk.vtkPoints()
    own.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points.T, dtype=float), deep=True))
    toWorld.TransformPoints(own, world)
    return numpy_support.vtk_to_numpy(world.GetData()).T


# A voxel of a segmentation counts as outside a volume when its centre lies beyond the volume's outer voxel faces
# (more than half of it outside: a voxel cut by the edge is edge rounding, as on any other grid); the note says so
# from OUTSIDE_NOTE_MIN_ML and OUTSIDE_NOTE_MIN_FRACTION of the segmentation's volume on, which is where it can change
# the figures shown (a Dice by about 0.005 or more): a few voxels along the edge are not said.
_FACE_TOL_VOXELS = 1e-3  # a centre on the face (grids half a voxel apart) is inside, whatever the rounding
OUTSIDE_NOTE_MIN_ML = 0.01
OUTSIDE_NOTE_MIN_FRACTION = 0.01


def volumeOutsideMl(node, volumeNode, segmentId: str | None = None) -> tuple[float, float]:
    """(ml of the lesion mask of `node`, ml of it outside the field of view of `volumeNode`), both measured on the
    node's own grid (`ownMask`), where nothing was lost: the part `maskFromNode` cannot put on the volume's grid,
    so that no Dice or volume measured there counts it. A voxel counts as outside when its centre lies beyond the
    volume's outer voxel faces."""
    mask = ownMask(node, segmentId)
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(mask))
    voxelMl = float(np.prod(mask.GetSpacing())) / 1000.0
    if len(i) == 0:
        return 0.0, 0.0
    own = LPS_TO_RAS @ ijk_to_lps(mask) @ np.vstack([i, j, k, np.ones(len(i))])
    world = np.vstack([toWorldRAS(node, own[:3]), np.ones(len(i))])
    index = np.linalg.inv(worldIJKToRAS(volumeNode)) @ world  # continuous (i, j, k) on the volume
    size = np.array(volumeNode.GetImageData().GetDimensions(), dtype=float)[:, None]
    low, high = -0.5 - _FACE_TOL_VOXELS, size - 0.5 + _FACE_TOL_VOXELS
    outside = np.any((index[:3] < low) | (index[:3] > high), axis=0)
    return len(i) * voxelMl, int(np.count_nonzero(outside)) * voxelMl


def outsideNote(node, volumeNode, counted: str, segmentId: str | None = None) -> list[str]:
    """A note when part of a segmentation lies outside the volume it is measured on (drawn on a scan with a larger
    extent, a labelmap on a larger grid): how much, and that `counted` (e.g. "the Dice or the volumes") leave it
    out. Nothing under `OUTSIDE_NOTE_MIN_ML` or `OUTSIDE_NOTE_MIN_FRACTION` of its volume (edge voxels)."""
    if node is None or volumeNode is None or node is volumeNode:
        return []
    total, outside = volumeOutsideMl(node, volumeNode, segmentId)
    if outside < OUTSIDE_NOTE_MIN_ML or outside < OUTSIDE_NOTE_MIN_FRACTION * total:
        return []
    return [f"{outside:.2f} ml of '{node.GetName()}' (of its {total:.2f} ml) lie outside the field of view of "
            f"'{volumeNode.GetName()}' and are not counted in {counted}"]


def referenceVolumeOf(node):
    """The volume a segmentation was drawn on (its reference geometry node; else, for DeepWML's result of a volume
    under a transform, which has none, the volume it was made from), or None."""
    if node is not None and node.IsA("vtkMRMLSegmentationNode"):
        return node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) \
            or node.GetNodeReference(SOURCE_VOLUME_ROLE)
    return None


def sourceRepresentationName(segmentation) -> str:
    """The representation a segmentation's segments are held in (what is saved, and edited): Slicer's "source"
    representation, named "master" before Slicer renamed it (GetMasterRepresentationName, kept a while after as a
    deprecated alias). Whichever of the two this Slicer has."""
    for name in ("GetSourceRepresentationName", "GetMasterRepresentationName"):
        method = getattr(segmentation, name, None)
        if method is not None:
            return method()
    raise DeepWMLError("this Slicer's segmentations have neither GetSourceRepresentationName nor "
                       "GetMasterRepresentationName; DeepWML does not know this version of Slicer")


def checkMaskTarget(segmentationNode) -> None:
    """Refuse a segmentation that holds its segments as closed surfaces (its source representation: one made from
    models or surface files) as the place for a mask, before anything runs or is written: Slicer would make the mask
    a smoothed surface, which measures less than the mask (a quarter less on a thick-slice FLAIR). None (a new
    segmentation) passes."""
    if segmentationNode is None:
        return
    source = sourceRepresentationName(segmentationNode.GetSegmentation())
    if source != slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName():
        raise DeepWMLError(f"'{segmentationNode.GetName()}' holds its segments as {source.lower()}s, so the mask put "
                           "into it would be smoothed into a surface and measure less; choose 'Create new "
                           "segmentation' as the output segmentation")


def segmentationFromMask(mask: sitk.Image, referenceVolumeNode, segmentationNode=None, name: str | None = None,
                         segmentName: str = WMH_SEGMENT_NAME, color=WMH_COLOR):
    """Put a 0/1 mask (on the reference volume's world grid) into a segmentation node as one segment.

    A new node is created when `segmentationNode` is None; otherwise its segment `segmentName` is
    replaced (every segment of that name) and its other segments are kept.
    """
    checkMaskTarget(segmentationNode)
    if segmentationNode is None:
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or segmentName)
        segmentationNode.CreateDefaultDisplayNodes()
    segmentation = segmentationNode.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    for previous in _named(segmentation, ids, segmentName):  # all of them: the lesion is every segment of its name
        segmentation.RemoveSegment(previous)
    if referenceVolumeNode.GetParentTransformNode() is None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    before = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
    # 0/1 bytes from the mask where it lies (no copy of it, nor a second mask cast to bytes)
    labelmap = _volumeFromArray((sitk.GetArrayViewFromImage(mask) > 0).view(np.uint8), mask, segmentName,
                                "vtkMRMLLabelMapVolumeNode")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
            raise DeepWMLError(f"the {segmentName} mask could not be imported into '{segmentationNode.GetName()}'")
    finally:
        removeNode(labelmap)
    added = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
             if segmentation.GetNthSegmentID(i) not in before]
    if added:
        segment = segmentation.GetSegment(added[0])
    else:  # an empty mask imports nothing; an empty segment still says "segmented, nothing found"
        segment = segmentation.GetSegment(segmentation.AddEmptySegment("", segmentName))
    segment.SetName(segmentName)
    segment.SetColor(*color)
    return segmentationNode


# ---------------------------------------------------------------------------------------------
# Sequences (a 4D or multi-frame series browsed in Slicer)


def sequenceFrame(volumeNode) -> dict | None:
    """The frame a volume shows when it is the proxy node of a sequence browser (a 4D or multi-frame series
    browsed with the Sequences module: the browser puts each frame's voxels into the one proxy node as it moves),
    else None. A dict: the browser's ID and name, its item number, the sequence's name and `label`, the frame as
    the browser names it (e.g. "time = 20 s"). Only names Slicer has had from 5.0 on (no "master"/"primary"
    sequence)."""
    scene = volumeNode.GetScene() if volumeNode is not None else None
    if scene is None:
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")  # none when the Sequences module is not loaded
    for n in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(n)
        if not browser.IsProxyNodeID(volumeNode.GetID()):
            continue
        item = int(browser.GetSelectedItemNumber())
        if item < 0:  # no frame selected (an empty sequence): the proxy holds none of them
            return None
        sequence = browser.GetSequenceNode(volumeNode)
        return {"browser": browser.GetID(), "browser_name": browser.GetName(), "item": item,
                "sequence": sequence.GetName() if sequence is not None else "",
                "label": _frameLabel(browser, sequence, item)}
    return None


def _frameLabel(browser, sequence, item: int) -> str:
    """A browser's item as it names it: its index name, value and unit ("time = 20 s"); "frame N" when it has none."""
    if sequence is None or not 0 <= item < sequence.GetNumberOfDataNodes():
        return f"frame {item + 1}"
    value = sequence.GetNthIndexValue(item)
    formatted = getattr(browser, "GetFormattedIndexValue", None)
    if formatted is not None:
        value = formatted(item) or value
    name, unit = sequence.GetIndexName(), sequence.GetIndexUnit()
    return f"{name or 'frame'} = {value}" + (f" {unit}" if unit else "") if value != "" else f"frame {item + 1}"


def showFrame(frame: dict, volumeNode) -> str | None:
    """Bring the sequence browser of `frame` (sequenceFrame's, taken when a run started) back to that frame when it
    was moved meanwhile, so that the result goes onto the voxels it was made from; returns the words that say it was
    moved, or None when it was not. A browser gone, or a frame it no longer has, is refused (nothing changed)."""
    name = volumeNode.GetName()
    browser = volumeNode.GetScene().GetNodeByID(frame["browser"])
    if browser is None or not browser.IsA("vtkMRMLSequenceBrowserNode") or not browser.IsProxyNodeID(volumeNode.GetID()):
        raise DeepWMLError(f"'{name}' was segmented at {frame['label']} of the sequence '{frame['sequence']}', and its "
                           "sequence browser was removed meanwhile: what it shows now may be another frame; "
                           "segment it again")
    now = int(browser.GetSelectedItemNumber())
    if now == frame["item"]:
        return None
    sequence = browser.GetSequenceNode(volumeNode)
    if sequence is None or frame["item"] >= sequence.GetNumberOfDataNodes() \
            or _frameLabel(browser, sequence, frame["item"]) != frame["label"]:
        raise DeepWMLError(f"'{name}' was segmented at {frame['label']} of the sequence '{frame['sequence']}', which "
                           "the sequence no longer has as it was; segment the frame again")
    moved = _frameLabel(browser, sequence, now)
    browser.SetSelectedItemNumber(frame["item"])
    return (f"The sequence browser '{browser.GetName()}' was moved to {moved} while '{name}' was being segmented: the "
            f"result is of {frame['label']}, the frame segmented, which is shown again")


# ---------------------------------------------------------------------------------------------
# Files and views


def loadVolumeFile(path: str, name: str | None = None, labelmap: bool = False):
    """Load a volume file: through Slicer's IO manager in the application, with the volumes logic
    (the reader that manager uses) when only slicer-core is present."""
    properties = {"singleFile": True, "labelmap": labelmap, "show": False}
    if name:
        properties["name"] = name
    if hasattr(slicer, "app"):
        try:
            return slicer.util.loadVolume(str(path), properties)
        except RuntimeError:
            _raiseWhyUnreadable(path)
    options = (1 if labelmap else 0) | 4  # bit 0: labelmap, bit 2: this file only
    warnings = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.SetGlobalWarningDisplay(False)  # each reader tried logs its failure; one message follows
    try:
        node = _standaloneVolumesLogic().AddArchetypeVolume(str(path), name or "volume", options)
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(warnings)
    if node is None:
        _raiseWhyUnreadable(path)
    return node


def _raiseWhyUnreadable(path) -> None:
    """DeepWMLLib's reader names the problem (truncated, empty, wrong type...) where Slicer's does not."""
    read_any(path)
    raise DeepWMLError(f"{path} cannot be loaded as a volume; check that it is a complete image file")


def loadSegmentationFile(path: str):
    """Load a .seg.nrrd file as a segmentation node."""
    if hasattr(slicer, "app"):
        try:
            return slicer.util.loadSegmentation(str(path))
        except RuntimeError as exc:
            raise DeepWMLError(f"{path} cannot be loaded as a segmentation ({str(exc).splitlines()[-1]})") from exc
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        removeNode(node)
        raise DeepWMLError(f"{path} cannot be loaded as a segmentation")
    node.CreateDefaultDisplayNodes()
    return node


def writeSegmentationFile(segmentationNode, path: str) -> None:
    """Write a segmentation node as .seg.nrrd with Slicer's segmentation storage node."""
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetScene(slicer.mrmlScene)
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentationNode):
        raise DeepWMLError(f"cannot write {path}; check free space and permissions")


def sliceCenterRAS(volumeNode, sliceIndex: int) -> tuple[float, float, float]:
    """World RAS position of the centre of axial slice `sliceIndex` (as numbered in DeepWML reports)."""
    probe = worldGeometry(volumeNode)
    ijkToRAS = worldIJKToRAS(volumeNode)
    index = (np.array(volumeNode.GetImageData().GetDimensions(), dtype=float) - 1) / 2
    index[axial_axis(probe)] = sliceIndex
    return tuple(float(v) for v in (ijkToRAS @ np.append(index, 1.0))[:3])


def jumpSlices(ras) -> None:
    """Centre every slice view on a RAS position."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


# ---------------------------------------------------------------------------------------------
# slicer-core without the application (batch script under plain Python, tests)

_standalone = {}


def initializeStandaloneScene():
    """Give `slicer` a scene and the logic objects volumes and segmentations need, when only
    slicer-core is present; returns the scene. A no-op inside the Slicer application."""
    if getattr(slicer, "mrmlScene", None) is not None:
        return slicer.mrmlScene
    scene = slicer.vtkMRMLScene()
    # Segment operations crash without a live application logic; these references keep them alive.
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    logics = {"application": applicationLogic}
    for name, className in (("Colors", "vtkSlicerColorLogic"), ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
                            ("Volumes", "vtkSlicerVolumesLogic")):
        logic = getattr(slicer, className)()
        logic.SetMRMLApplicationLogic(applicationLogic)
        warnings = vtk.vtkObject.GetGlobalWarningDisplay()
        # Without an installation the colour logic complains once that it has no colour files to load.
        vtk.vtkObject.SetGlobalWarningDisplay(warnings and name != "Colors")
        logic.SetMRMLScene(scene)
        vtk.vtkObject.SetGlobalWarningDisplay(warnings)
        applicationLogic.SetModuleLogic(name, logic)
        logics[name] = logic
    applicationLogic.SetColorLogic(logics["Colors"])
    _standalone.update(logics, scene=scene)
    slicer.mrmlScene = scene
    return scene


def _standaloneVolumesLogic():
    if _standalone.get("scene") is not slicer.mrmlScene:
        raise DeepWMLError("no Slicer application and no standalone scene: call initializeStandaloneScene() first")
    return _standalone["Volumes"]
