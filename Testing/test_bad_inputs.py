"""Every bad input a user can hand DeepWML gets a one-line, actionable message and a non-zero exit,
or a documented correct result — never a traceback, a hang, a partial output file or a changed input.

`BAD_INPUTS` is the single list behind both this test and the table in README.md ("What happens
with bad inputs"); `test_readme_table_matches` keeps the two in step.
"""

from __future__ import annotations

import csv
import errno
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepWMLLib import io
from DeepWMLLib.cli import main

from conftest import (REPO, drop_pixel_spacing, encoded_dicom_series, make_volume, mni_t1_thick, nifti2_of,
                      relabel_transfer_syntax, set_orientation, tiny_model_file, write_dicom_series)

# (id, command, what the user gets: exit code and words of the one-line message; "ok" = documented result)
BAD_INPUTS = [
    ("missing file", "segment", 1, "does not exist"),
    ("empty file (0 bytes)", "segment", 1, "empty file"),
    ("truncated .nii.gz", "segment", 1, "truncated"),
    ("truncated .nii", "segment", 1, "truncated"),
    ("corrupt gzip", "segment", 1, "corrupt"),
    ("text file named .nii.gz", "segment", 1, "corrupt"),
    ("text file named .nrrd", "segment", 1, "cannot be read"),
    ("an NRRD file renamed .nii.gz", "segment", 1, "is in NRRD format, though its name ends in .nii.gz; rename it"),
    ("a .nii.gz file renamed .nrrd", "segment", 1, "is in gzip-compressed NIfTI format, though its name ends in .nrrd"),
    ("unsupported extension", "segment", 1, "unsupported file type"),
    ("2D image", "segment", 1, "2D image"),
    ("2D NRRD slice placed in 3D space (`space dimension: 3`, two axes)", "segment", 1, "2D image"),
    ("4D image (several volumes)", "segment", 1, "4D image"),
    ("RGB / vector image", "segment", 1, "values per voxel"),
    ("all-zero image", "segment", 1, "constant"),
    ("NaN / Inf voxels", "segment", 1, "non-finite"),
    ("a scan whose brightest voxels wrapped around to negative (a conversion that overflowed signed 16 bits: lesions "
     "would read as the darkest)", "segment", 1, "values that wrapped around"),
    ("a scan whose brightest voxels wrapped around past 65535 to near 0 (a conversion that overflowed unsigned 16 bits: "
     "lesions would read as dark holes)", "segment", 1, "values that wrapped around"),
    ("folder without images", "segment", 1, "without image files"),
    ("scans of one name in folders of their own (`patient07/flair.nii.gz`, `patient19/flair.nii.gz`)", "segment", 0,
     "ok: each named after the folder that tells it apart (`patient07_flair`, `patient19_flair`)"),
    ("two scans of one name in one folder (`case01.nii.gz`, `case01.mha`: no folder tells them apart)", "segment", 1,
     "both named"),
    ("two scans in one folder whose names differ only in upper/lower case (`A.nii.gz`, `a.mha`: one file name on "
     "macOS and Windows)", "segment", 1, "alike but for upper/lower case"),
    ("extreme intensities (1e30)", "segment", 0, "ok: normalisation is scale-free"),
    ("NIfTI whose header gives lengths in metres", "segment", 0, "ok: read in mm, as SimpleITK reads it"),
    ("NIfTI whose header gives lengths in metres beside voxel sizes in mm (a wrong unit: SimpleITK would read 1000 "
     "times larger voxels)", "segment", 1, "look like mm with the wrong unit"),
    ("NIfTI whose header gives a voxel size of 0 (pixdim; SimpleITK would read 1 mm)", "segment", 1, "voxel size of 0"),
    ("a grid whose axes are not at right angles (sheared)", "segment", 1, "sheared grid"),
    ("NIfTI whose sform gives other voxel sizes than its pixdim (SimpleITK takes pixdim, FSL the sform)", "segment", 1,
     "two voxel sizes"),
    ("NIfTI whose sform is sheared, its slice axis leaning 15 degrees (SimpleITK places it by the qform, FSL by the "
     "sform)", "segment", 1, "sform places the voxels on a sheared grid"),
    ("NIfTI whose header's first field (its size, 348) is damaged (SimpleITK reads it all the same, unchecked)",
     "segment", 1, "is not a NIfTI file"),
    ("NIfTI without the NIfTI mark (`n+1`; SimpleITK would read it as Analyze, on no orientation)", "segment", 1,
     "lacks the NIfTI mark"),
    ("NIfTI whose header gives a size of 0 or below along an axis (SimpleITK would read one slice)", "segment", 1,
     "a size below 1"),
    ("NIfTI whose datatype and bitpix disagree (8-bit voxels of 16 bits: SimpleITK would read half of each)", "segment",
     1, "bits (bitpix) of a type of"),
    ("NIfTI whose voxels start inside its header (vox_offset below 348: SimpleITK would read the header as voxels)",
     "segment", 1, "not after the header's 348 bytes"),
    ("NIfTI holding more voxel data than its header's sizes and type need (a slice too few: SimpleITK would read the "
     "first bytes)", "segment", 1, "its header's sizes and type need"),
    ("NIfTI whose sform (or qform) in use holds NaN", "segment", 1, "holds values that are not numbers"),
    ("an image whose voxel size is no MRI's (NRRD `space directions: (1e30,0,0) ...`: an \"ok\" of nonsense volumes)",
     "segment", 1, "voxel size is no MRI's"),
    ("NRRD whose `space origin` is not numbers (`(nan,nan,nan)`: the image library read 0, 0, 0 and the mask lay "
     "elsewhere in the patient), whose `space directions` are not numbers or of length 0 (all NaN read as 1 mm), or "
     "whose `spacings` are infinite or 0", "segment", 1, "'space origin: (nan,nan,nan)', not 3 numbers"),
    ("NIfTI whose qform in use is no rotation: a quaternion beyond a unit one's (`quatern_b` 2: the image library "
     "made up a rotation) or a handedness (`pixdim[0]`) of NaN", "segment", 1, "no unit quaternion's"),
    ("NIfTI whose sform holds NaN but is not in use (`sform_code` 0)", "segment", 0,
     "ok: placed by its qform, as the standard says; the mask keeps the input's header fields"),
    ("NRRD of binary voxels whose header says `encoding: ascii` (the NRRD library crashed the process)", "segment", 1,
     "on which the NRRD library would crash"),
    ("MetaImage whose NDims is no count of axes (-1 hung the image library; 100 or 2147483648 crashed the process)",
     "segment", 1, "not a count of 2 to 5 axes"),
    ("NRRD or MetaImage without a voxel size (SimpleITK would read 1 mm)", "segment", 1, "gives no voxel size"),
    ("NRRD whose lengths are in m or cm (space units; SimpleITK would read mm)", "segment", 1, "gives lengths in"),
    ("NRRD series: a time axis beside three in space (`kinds: domain domain domain time`, its direction `none`)",
     "segment", 1, "is a 4D image"),
    ("NRRD of several volumes on a list axis (a 3D Slicer sequence `.seq.nrrd`, a multi-volume or a DWI; SimpleITK "
     "reads a vector image)", "segment", 1, "is a 4D image"),
    ("NRRD or MetaImage whose voxel data file is longer than its header's sizes and type need (a slice too few, a "
     "preamble not skipped: SimpleITK would read the first bytes)", "segment", 1, "correct the header's sizes"),
    ("MetaImage whose AnatomicalOrientation lays the axes along other body axes than its TransformMatrix (a sagittal "
     "scan's matrix written row by row, or left out)", "segment", 1, "plane of its slices is unknown"),
    ("MetaImage whose TransformMatrix is no matrix of directions (NaN, an axis of length 0 or scaled by the voxel "
     "sizes: refused in the image library's words, or called a sheared grid)", "segment", 1,
     "TransformMatrix = nan 0 0 0 1 0 0 0 1, not 9 numbers"),
    ("MetaImage of compressed voxels without their true size (CompressedDataSize; SimpleITK would return leftover "
     "memory)", "segment", 1, "CompressedDataSize"),
    ("MetaImage whose ElementSpacing SimpleITK misreads (a 4D file's CenterOfRotation of three values: 1 mm read)",
     "segment", 1, "but the image library read"),
    ("MetaImage of a file per slice naming fewer files than slices (ElementDataFile: a LIST or numbered pattern; "
     "SimpleITK would fill the others with leftover memory)", "segment", 1, "for its"),
    ("MetaImage with its voxels written as text (BinaryData = False)", "segment", 0, "ok: read as written (the same voxels as binary)"),
    ("MetaImage with its voxels written as text, fewer numbers than voxels (cut short, or a word among them)", "segment", 1,
     "written as text (BinaryData = False)"),
    ("MetaImage with its voxels written as text that its ElementType cannot hold (1.7 or -1 in MET_USHORT), or"
     " more numbers than voxels (SimpleITK would cut, wrap or ignore them)", "segment", 1, "reads them otherwise"),
    ("NIfTI-2 file", "segment", 0, "ok: read like NIfTI-1 (outputs NIfTI-1)"),
    ("NIfTI-1 pair (`.hdr` + `.img`, as SPM writes)", "segment", 0, "ok: read like a .nii (outputs .nii.gz)"),
    ("compressed NIfTI-1 pair (`.hdr.gz` + `.img.gz`)", "segment", 0, "ok: read like a .nii.gz (outputs .nii.gz)"),
    ("Analyze 7.5 pair (`.hdr` + `.img` without the NIfTI mark: no orientation, left and right ambiguous)", "segment", 1,
     "Analyze 7.5 header"),
    ("NIfTI without orientation (qform_code and sform_code 0: SimpleITK and FSL place it in different ways)", "segment",
     1, "gives no orientation"),
    ("gzip-compressed NIfTI named .nii", "segment", 0, "ok: read by its content"),
    ("a file name in upper case (`SCAN.MHA`, `SCAN.NII.GZ`)", "segment", 0, "ok: read as in lower case"),
    ("one-slice volume", "segment", 0, "ok: one slice segmented"),
    ("one sagittal slice cut from an axial scan (axial slices 1 pixel wide)", "segment", 1, "too narrow to segment"),
    ("sagittal acquisition", "segment", 0, "ok: axial planes segmented, warning printed"),
    ("axial slices thinner than their pixels (1 x 1 x 0.8 mm)", "segment", 0, "ok: called axial, no plane warning"),
    ("corrupt model file", "segment", 1, "not a readable DeepWML model"),
    ("model file of a newer format", "segment", 1, "update DeepWML"),
    ("model file whose weights changed on the way (a bad copy: torch itself reads it)", "segment", 1,
     "fails its checksum"),
    ("another program's PyTorch checkpoint given as the model", "segment", 1, "holds Python objects"),
    ("a bare PyTorch state_dict (network weights only) given as the model", "segment", 1,
     "holds network weights only"),
    ("the run folder of a trained ensemble given as the model (`deepwml train --ensemble 2`'s RUN_DIR)", "segment", 1,
     "its members' model files are"),
    ("a scan given with --model (INPUT before it)", "segment", 2, "is an image, not a model file"),
    ("the same model given twice in an ensemble", "segment", 0, "ok: averaged in twice, warning printed (\"is given 2 times\")"),
    ("output folder missing", "segment", 0, "ok: created"),
    ("output folder read-only", "segment", 1, "not writable"),
    ("output disk full", "segment", 1, "the disk is full"),
    ("existing outputs", "segment", 0, "ok: kept, case skipped (use --overwrite)"),
    ("existing outputs made with other settings (`--threshold`, `--model`, `--tta`...)", "segment", 1, "made with other settings"),
    ("an earlier run's outputs without its report (stopped part way)", "segment", 1, "incomplete set of outputs"),
    ("an earlier run killed outright while writing the case (its hidden journal left), rerun without its options",
     "segment", 1, "stopped part way"),
    ("a case done before whose saved mask was replaced by one of another grid, asked for an output it lacks (`--qc`)",
     "segment", 1, "is not on the scan's grid"),
    ("a case done before whose saved mask was edited since, asked for an output it lacks (`--qc`)", "segment", 1,
     "was changed since the run that made it"),
    ("outputs of another scan of the same name in OUTDIR", "segment", 1, "holds the results of another scan"),
    ("an output name taken by a scan given (OUTDIR the input folder)", "segment", 1, "is one of the scans given"),
    ("a file name that is not UTF-8 text", "segment", 1, "not UTF-8 text"),
    ("a case name too long for its output file names", "segment", 1, "too long for its output files"),
    ("a link to a file that cannot be reached", "segment", 1, "cannot be reached"),
    ("--device cuda without a GPU", "segment", 1, "no CUDA GPU"),
    ("a --backend whose runtime is not installed (`--backend openvino` without OpenVINO)", "segment", 1,
     "the openvino backend needs OpenVINO"),
    ("--precision bf16 on a CPU without native bf16 (AMX or AVX512-BF16: PyTorch emulates it, 8 times slower)", "segment", 1,
     "--precision bf16 needs a CPU with native bf16"),
    ("threshold outside (0, 1)", "segment", 2, "must be between 0 and 1"),
    ("batch size 0", "segment", 2, "must be at least 1"),
    ("INPUT after --model (taken as a model file)", "segment", 2, "put INPUT before --model"),
    ("a --model name that is no file nor a shipped model or ensemble (a typo)", "segment", 2,
     "no such model file, nor a shipped model or ensemble of that name (shipped: "),
    ("--no-location with --ventricle-model", "segment", 2, "cannot go with"),
    ("a ventricle model given as the WMH model", "segment", 1, "is a ventricle model, not a WMH model"),
    ("--save-ventricle-mask without a ventricle model", "segment", 2, "needs a ventricle model"),
    ("a lesion mask given as the FLAIR", "segment", 1, "looks like a label mask"),
    ("a lesion mask labelled one value per lesion (more than 16 lesions) given as the FLAIR", "segment", 1,
     "looks like a label mask of many labels"),
    ("a probability map of an earlier run given as the FLAIR (`deepwml segment out/CASE_prob.nii.gz`: grey-scale, "
     "segmented before with its brain mask failed)", "segment", 1, "is an output of an earlier DeepWML run"),
    ("an earlier run's OUTDIR given as the input folder (`deepwml segment out/ -o out2/`)", "segment", 1,
     "holds only the outputs of an earlier DeepWML run"),
    ("a lesion mask found beside its FLAIR in a folder given (a labelled case's folder)", "segment", 0,
     "ok: the FLAIR segmented, the mask skipped (\"looks like a label mask\" in summary.csv), not failed"),
    ("a lesion mask named beside its FLAIR (a shell glob, `deepwml segment data/patient07/*`)", "segment", 0,
     "ok: the FLAIR segmented, the mask skipped with a warning naming it, not failed"),
    ("a folder holding only label masks (the masks' folder given for the scans')", "segment", 1,
     "like a label mask or segmentation, not a FLAIR scan, so nothing was segmented"),
    ("a Slicer segmentation (`.seg.nrrd`) of its scan's name beside it in a folder given", "segment", 0,
     "ok: the scan segmented, the segmentation skipped unread, no clash of names"),
    ("output folder is a file", "segment", 1, "a file of that name exists"),
    ("a DICOM study folder with two FLAIR-like series", "segment", 1, "2 look like a FLAIR"),
    ("--series naming no series of the DICOM folder given (or of none of the folders given)", "segment", 1, "holds 2 DICOM series and none match --series 'T2'"),
    ("a T1-weighted scan given as the FLAIR", "segment", 0, "ok: segmented, warning printed (\"does not look like a FLAIR\")"),
    ("a T1-weighted scan given as the FLAIR with --no-brain-mask (marks outside the brain kept; the brain mask still "
     "made for the checks)", "segment", 0, "ok: segmented, warning printed (\"does not look like a FLAIR\")"),
    ("a scan with a bright line through every slice (an RF zipper or stripe artefact, which the network marks as "
     "lesion)", "segment", 0, "ok: segmented, warning printed (\"straight bright line\")"),
    ("a scan exported in a display window (8-bit, its brightest voxels cut to one value, lesions with them)", "segment",
     0, "ok: segmented, warning printed (\"looks clipped\")"),
    ("a DICOM series with a slice missing (incomplete transfer)", "segment", 1, "not evenly spaced"),
    ("a DICOM series without Pixel Spacing (a screen capture; GDCM would read 1 mm)", "segment", 1, "no Pixel Spacing"),
    ("a DICOM series whose Image Orientation (Patient) is missing, not numbers or no pair of unit vectors at right "
     "angles (a row of zeros: GDCM would read the slices as axial, without a word)", "segment", 1,
     "is no pair of unit vectors at right angles (the directions of their rows and columns)"),
    ("a DICOM series whose Samples per Pixel is 0 (a damaged header, at which GDCM stops: an internal error before)",
     "segment", 1, "whose header the DICOM library cannot read"),
    ("a DICOM series compressed in a transfer syntax GDCM cannot decode (JPEG XL)", "segment", 1,
     "cannot decode (transfer syntax 1.2.840.10008.1.2.4.110): export the series again uncompressed"),
    ("a DICOM series some of whose files are labelled Explicit VR Big Endian but hold implicit VR little endian data "
     "(a broken export: GDCM took 3 s and a gigabyte of memory a file, a minute and more a series)", "segment", 1,
     "are labelled Explicit VR Big Endian (Transfer Syntax UID 1.2.840.10008.1.2.2 in their file meta header), but "
     "their data set is implicit VR little endian"),
    ("a DICOM series whose Rows do not fit its Pixel Data (halved in the header: GDCM read the first half of each slice "
     "as a whole image, without an error)", "segment", 1,
     "gives 16 rows x 32 columns of 16 bits (1024 bytes), but its Pixel Data holds 2048 bytes"),
    ("a DICOM series in explicit VR big endian whose Rows do not fit its Pixel Data (halved in the header: big endian and "
     "deflated files went unchecked, the first half of each slice read as a whole image)", "segment", 1,
     "gives 16 rows x 32 columns of 16 bits (1024 bytes), but its Pixel Data holds 2048 bytes"),
    ("a DICOM series whose Columns is one too small in images of fewer rows than columns (a rectangular field of view: "
     "fewer bytes past the image than a row, taken for padding before; GDCM read every row sheared)", "segment", 1,
     "gives 48 rows x 63 columns of 16 bits (6048 bytes), but its Pixel Data holds 6144 bytes"),
    ("a DICOM series whose Pixel Data holds padding past its pixels (1000 bytes of zeros, more than a row: older applications "
     "sent it, PS3.5 8.1.1; refused before as a damaged header)", "segment", 0,
     "ok: read voxel for voxel, as without the padding"),
    ("a DICOM folder whose T1 series holds a file labelled Explicit VR Big Endian while its data set is little endian, "
     "beside the FLAIR (it blocked every series of the folder)", "segment", 0,
     "ok: the FLAIR segmented; the T1 alone is refused when chosen, naming the file"),
    ("--dicom-outline with a NIfTI input", "segment", 0, "ok: segmented, no outline series, warning printed (\"the input is not DICOM\")"),
    ("--dicom-outline where the outline folder holds other files", "segment", 1, "did not write there"),
    ("--dicom-outline --overwrite where the outline folder holds a FLAIR's images named as the series' (IM*.dcm; they "
     "were deleted as DeepWML's)", "segment", 1, "not DeepWML's outline series"),
    ("--dicom-seg with a NIfTI input", "segment", 0, "ok: segmented, no DICOM SEG, warning printed (\"the input is not DICOM\")"),
    ("--dicom-seg with a DICOM series without a Frame of Reference UID", "segment", 1, "no Frame of Reference UID"),
    ("a folder holding only a DICOM SEG (a segmentation sent back from PACS; it was read as the scan and called a label "
     "mask)", "segment", 1, "holds only a DICOM Segmentation (Modality SEG"),
    ("a DICOM SEG given as the reference (a rater's outline from PACS: the folder it was exported in; it was refused "
     "as no scan, and a SEG file as an unsupported file type)", "evaluate", 0,
     "ok: read by its segments and frames (Dice 1 against the mask it holds)"),
    ("a DICOM SEG given as the reference whose frames lie between the scan's slices (a frame moved half a slice)",
     "evaluate", 1, "has frames between slices"),
    ("a DICOM SEG given as the reference stored compressed by JPEG 2000 (DeepWML decodes uncompressed, deflated and "
     "RLE Lossless ones)", "evaluate", 1, "which DeepWML does not decode (it reads uncompressed, deflated and RLE "
     "Lossless ones); save it uncompressed"),
    ("a DICOM SEG given as the reference stored RLE Lossless (refused before as compressed)", "evaluate", 0,
     "ok: decoded by DeepWML itself (Dice 1 against the mask it holds)"),
    ("a DICOM SEG given as the reference, RLE Lossless with each frame split over two fragments (non-standard: "
     "DCMTK's dcmcrle --fragment-size writes it so)", "evaluate", 1,
     "DICOM stores each RLE frame in exactly one fragment (PS3.5 A.4.2)"),
    ("a DICOM SEG given as the reference of Segmentation Type LABELMAP (Label Map Segmentation Storage, DICOM 2024: "
     "each pixel its segment's number; refused before)", "evaluate", 0,
     "ok: its lesion segment's pixels read (Dice 1 against the mask it holds)"),
    ("a LABELMAP DICOM SEG given as the reference listing a segment number its 8-bit pixels cannot hold (300; an "
     "internal error before)", "evaluate", 1, "is LABELMAP with 8-bit pixels, and lists segment 300, which they "
     "cannot hold (up to 255)"),
    ("a folder holding two DICOM SEGs given as the reference (two raters' outlines exported together: which one is "
     "meant is not known)", "evaluate", 1, "holds 2 DICOM Segmentation series"),
    ("change --dicom-seg with a DICOM follow-up without a Frame of Reference UID", "change", 1,
     "no Frame of Reference UID"),
    ("a case's folder given as the reference, not the mask file in it", "evaluate", 1,
     "is a folder of image files (consensus_mask.nii.gz, flair.nii.gz), not one image nor a DICOM series"),
    ("reference on another grid", "evaluate", 1, "different voxel grids"),
    ("a mask file made of an array with its axes swapped (the scan's sizes in another order, on its voxels)", "evaluate",
     1, "make the mask again from the array transposed"),
    ("reference storing the same grid in another voxel order", "evaluate", 0, "ok: reordered onto it, nothing interpolated"),
    ("reference saved cropped to its lesions on the same voxels (Slicer's 'Crop to minimum extent')", "evaluate", 0,
     "ok: padded with zeros onto the prediction's grid, nothing interpolated"),
    ("reference mixing lesion labels (1 and 7)", "evaluate", 1, "label"),
    ("two-valued 0/255 reference", "evaluate", 0, "ok: 255 read as lesion"),
    ("a float mask whose lesion value is 1 but for float round-off (0.99999994, 1.0000001)", "evaluate", 0,
     "ok: read as 0/1 (Dice 1 against the mask itself)"),
    ("a NIfTI mask with NaN voxels", "evaluate", 1, "set them to 0"),
    ("a reference given as a Slicer segmentation (`.seg.nrrd`) whose `space origin` is not numbers (`(nan,nan,nan)`: "
     "an internal error)", "evaluate", 1, "'space origin: (nan,nan,nan)', not 3 numbers"),
    ("probability map as mask", "evaluate", 1, "not a label mask"),
    ("the FLAIR given as the probability map (`--probabilities`, for ROC AUC)", "evaluate", 1,
     "is not a probability map"),
    ("a picture asked for under another format's name (`--qc case.jpg`)", "evaluate", 2, "give a file name ending .png"),
    ("empty prediction and reference", "evaluate", 0, "ok: Dice 1, HD95 0 (documented convention)"),
    ("a reference of 0 and 2 only (2 is ignore: no lesion left)", "evaluate", 1, "holds only 0 and 2"),
    ("a mask with negative values (int16)", "evaluate", 1, "negative values"),
    ("an 8-bit FLAIR given as the prediction", "evaluate", 1, "looks like a scan, not a label mask"),
    ("a 16-bit FLAIR given as the reference", "evaluate", 1, "looks like a scan, not a label mask"),
    ("an empty reference", "evaluate", 0, "ok: the printed note says which metrics are undefined and why"),
    ("rater masks on different grids", "consensus", 1, "different voxel grids"),
    ("two rater masks each saved cropped to its own lesions", "consensus", 0,
     "ok: compared on the extent of both, nothing interpolated (the whole scan's Dice); a note says slice numbers are not the scan's"),
    ("consensus manifest missing columns", "consensus", 1, "column"),
    ("training manifest missing", "train", 1, "does not exist"),
    ("a scan given as the training manifest", "train", 1, "is an image, not a manifest CSV"),
    ("training mask on another grid", "train", 1, "different voxel grids"),
    ("--init model of another architecture", "train", 1, "has architecture"),
    ("one scan under two case names", "train", 1, "has the FLAIR of case"),
    ("a T1-weighted scan given as a training case's FLAIR", "train", 1, "do not look like a FLAIR"),
    ("training run folder given is a file", "train", 1, "a file of that name exists"),
    ("training option out of range (--epochs 0)", "train", 2, "must be at least 1"),
    ("a model without batch normalisation given to adapt (no statistics to adapt)", "adapt", 1,
     "the model has no batch normalisation; there are no statistics to adapt"),
    ("evaluate without a case", "evaluate", 2, "give --prediction and --reference"),
    ("synthetic data into a file", "synth", 1, "a file of that name exists"),
    ("baseline and follow-up the same file", "change", 2, "the same file"),
    ("a baseline mask on another grid", "change", 1, "different voxel grids"),
    ("a baseline mask on the scan's voxels with lesion voxels beyond the scan's extent", "change", 1,
     "non-zero voxels lie outside"),
    ("a follow-up mask saved cropped to its lesions on the follow-up's voxels", "change", 0,
     "ok: padded with zeros onto the follow-up's grid"),
    ("both masks given with --model", "change", 2, "nothing is segmented"),
    ("change --device cuda without a GPU", "change", 1, "no CUDA GPU"),
    ("change --precision bf16 on a CPU without native bf16", "change", 1, "--precision bf16 needs a CPU with native bf16"),
    ("change: a brain-mask model given as the WMH model (--model)", "change", 1,
     "is a brain-mask model, not a WMH model"),
    ("the baseline's and the follow-up's masks given the wrong way round", "change", 1,
     "lies on the follow-up FLAIR's grid, not the baseline's"),
    ("export: a mask on another grid than the FLAIR's", "export", 1, "different voxel grids"),
    ("export: DeepWML's DICOM SEG of another, unevenly spaced series as the mask (its frames name none of the FLAIR "
     "series' images; it was placed by its own positions, with a warning only)", "export", 1,
     "a segmentation of another series; give the FLAIR series it was made on"),
    ("export into an OUTDIR holding the case's earlier export", "export", 1, "rerun with --overwrite to replace"),
    ("export --overwrite into an OUTDIR holding `deepwml segment`'s outputs of the case (its mask and report would "
     "no longer agree)", "export", 1, "which an export's report would replace"),
    ("export --case naming a path (`../up`), not a file name", "export", 2, "is no file name"),
    ("export --dicom-seg of a FLAIR that is not DICOM", "export", 0,
     "ok: the report, and a warning that no DICOM SEG was written (no patient or study to write one into)"),
    ("export --creator that is no DICOM Person Name (six ^-separated parts; a backslash, a control character, bytes "
     "that are not UTF-8, over 64 bytes of UTF-8 are refused too)", "export", 2, "a DICOM Person Name has at most 5"),
    ("export --no-location with --ventricle-model", "export", 2, "cannot go with"),
    ("export --device cuda without a GPU, with a ventricle model", "export", 1, "no CUDA GPU"),
    ("export --no-brain-mask (or --brain-model) with no ventricle model (no split made: they would change nothing)",
     "export", 2, "needs a ventricle model"),
    ("export --brain-model (or --no-brain-mask) with --no-location", "export", 2, "cannot go with --brain-model"),    ("export: a WMH model given as --brain-model (with a ventricle model)", "export", 1, "is not a brain-mask model"),
]

# Refusals of what an option asks for, not of an input: each refused before OUTDIR is made or a scan read
REFUSED_BY_OPTIONS = {
    "--device cuda without a GPU", "a --backend whose runtime is not installed (`--backend openvino` without OpenVINO)",
    "change --device cuda without a GPU", "change: a brain-mask model given as the WMH model (--model)",
    "--precision bf16 on a CPU without native bf16 (AMX or AVX512-BF16: PyTorch emulates it, 8 times slower)",
    "change --precision bf16 on a CPU without native bf16",
    "export --device cuda without a GPU, with a ventricle model", "a ventricle model given as the WMH model",
    "threshold outside (0, 1)", "batch size 0", "a --model name that is no file nor a shipped model or ensemble (a typo)",
    "--no-location with --ventricle-model", "--save-ventricle-mask without a ventricle model",
    "export --case naming a path (`../up`), not a file name", "export --no-location with --ventricle-model",
    "export --creator that is no DICOM Person Name (six ^-separated parts; a backslash, a control character, bytes "
    "that are not UTF-8, over 64 bytes of UTF-8 are refused too)", "both masks given with --model",
    "a model without batch normalisation given to adapt (no statistics to adapt)",
    "export --no-brain-mask (or --brain-model) with no ventricle model (no split made: they would change nothing)",
    "export --brain-model (or --no-brain-mask) with --no-location",
    "--series naming no series of the DICOM folder given (or of none of the folders given)",
    "export: a WMH model given as --brain-model (with a ventricle model)",
}


def _write(path: Path, image: sitk.Image) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _array_image(array, spacing=None, vector=False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing:
        image.SetSpacing(spacing)
    return image


@pytest.fixture
def world(tmp_path):
    """Inputs for every row of BAD_INPUTS, and a model."""
    d = tmp_path / "in"
    d.mkdir()
    good, truth = make_volume(size=(32, 32, 5))
    paths = {"good": _write(d / "good.nii.gz", good), "truth": _write(d / "truth.nii.gz", truth)}
    data = paths["good"].read_bytes()
    raw = gzip.decompress(data)
    files = {
        "empty file (0 bytes)": (d / "empty.nii.gz", b""),
        "truncated .nii.gz": (d / "trunc.nii.gz", data[: len(data) * 2 // 3]),
        "truncated .nii": (d / "trunc.nii", raw[:-200]),
        "corrupt gzip": (d / "corrupt.nii.gz", data[:100] + bytes(300) + data[400:]),
        "text file named .nii.gz": (d / "text.nii.gz", b"patient list\n"),
        "text file named .nrrd": (d / "text.nrrd", b"patient list\n"),
        "unsupported extension": (d / "flair.jpg", b"\xff\xd8\xff"),
    }
    for key, (path, content) in files.items():
        path.write_bytes(content)
        paths[key] = path
    nan = sitk.GetArrayFromImage(good)
    nan[1, 2, 3] = np.nan
    paths["2D image"] = _write(d / "slice.nii.gz", _array_image(np.ones((20, 30), np.float32)))
    placed = ("NRRD0004\ntype: float\ndimension: 2\nsizes: 30 20\nspace: left-posterior-superior\n"
              "space directions: (0.9,0,0) (0,0.9,0)\nspace origin: (-10,20,35)\nendian: little\nencoding: raw\n\n")
    paths["2D NRRD slice placed in 3D space (`space dimension: 3`, two axes)"] = d / "placed_slice.nrrd"
    (d / "placed_slice.nrrd").write_bytes(placed.encode() + np.ones((20, 30), "<f4").tobytes())
    paths["4D image (several volumes)"] = _write(d / "series.nii.gz", _array_image(np.random.rand(2, 4, 5, 6).astype(np.float32)))
    paths["RGB / vector image"] = _write(d / "rgb.mha", _array_image(np.random.rand(4, 5, 6, 3).astype(np.float32), vector=True))
    paths["all-zero image"] = _write(d / "zeros.nii.gz", _array_image(np.zeros((5, 6, 7), np.int16)))
    paths["NaN / Inf voxels"] = _write(d / "nan.nii.gz", _array_image(nan))
    (d / "emptydir").mkdir()
    paths["folder without images"] = d / "emptydir"
    for patient in ("patient07", "patient19"):
        (d / "a" / patient).mkdir(parents=True)
    paths["scans of one name in folders of their own (`patient07/flair.nii.gz`, `patient19/flair.nii.gz`)"] = [
        _write(d / "a" / "patient07" / "flair.nii.gz", good), _write(d / "a" / "patient19" / "flair.nii.gz", good)]
    (d / "b").mkdir()
    paths["two scans of one name in one folder (`case01.nii.gz`, `case01.mha`: no folder tells them apart)"] = [
        _write(d / "b" / "case01.nii.gz", good), _write(d / "b" / "case01.mha", good)]
    (d / "x").mkdir()
    paths["two scans in one folder whose names differ only in upper/lower case (`A.nii.gz`, `a.mha`: one file name "
          "on macOS and Windows)"] = [_write(d / "x" / "A.nii.gz", good), _write(d / "x" / "a.mha", good)]
    extreme = sitk.GetImageFromArray(sitk.GetArrayFromImage(good) * np.float32(1e30))
    extreme.CopyInformation(good)
    paths["extreme intensities (1e30)"] = _write(d / "extreme.nii.gz", extreme)
    metres = sitk.Image(good)  # the same head, its lengths written in metres (xyzt_units 1)
    metres.SetSpacing([x / 1000 for x in good.GetSpacing()])
    metres.SetOrigin([x / 1000 for x in good.GetOrigin()])
    header = bytearray(gzip.decompress(_write(d / "metres.nii.gz", metres).read_bytes()))
    header[123] = (header[123] & 0xF8) | 1
    (d / "metres.nii.gz").write_bytes(gzip.compress(bytes(header)))
    paths["NIfTI whose header gives lengths in metres"] = d / "metres.nii.gz"
    unplaced = bytearray(raw)
    struct.pack_into("<2h", unplaced, 252, 0, 0)  # qform_code, sform_code
    paths["NIfTI without orientation (qform_code and sform_code 0: SimpleITK and FSL place it in different ways)"] = \
        d / "unplaced.nii"
    (d / "unplaced.nii").write_bytes(unplaced)
    wrong_unit = bytearray(raw)  # the head in mm, its unit set to metres
    wrong_unit[123] = (wrong_unit[123] & 0xF8) | 1
    paths["NIfTI whose header gives lengths in metres beside voxel sizes in mm (a wrong unit: SimpleITK would read "
          "1000 times larger voxels)"] = d / "wrong_unit.nii"
    (d / "wrong_unit.nii").write_bytes(wrong_unit)
    zero = bytearray(raw)
    struct.pack_into("<f", zero, 88, 0.0)  # pixdim[3]: the slice thickness
    paths["NIfTI whose header gives a voxel size of 0 (pixdim; SimpleITK would read 1 mm)"] = d / "zero.nii"
    (d / "zero.nii").write_bytes(zero)
    two_sizes = bytearray(raw)
    struct.pack_into("<f", two_sizes, 320, struct.unpack_from("<f", two_sizes, 320)[0] * 1.2)  # sform: 6 mm slices
    paths["NIfTI whose sform gives other voxel sizes than its pixdim (SimpleITK takes pixdim, FSL the sform)"] = \
        d / "two_sizes.nii"
    (d / "two_sizes.nii").write_bytes(two_sizes)
    leaning = bytearray(raw)
    srow = list(struct.unpack_from("<12f", leaning, 280))
    slice_mm = math.hypot(srow[2], srow[6], srow[10])
    srow[2:11:4] = [srow[2] + slice_mm * math.sin(math.radians(15)), srow[6], srow[10] * math.cos(math.radians(15))]
    struct.pack_into("<12f", leaning, 280, *srow)
    paths["NIfTI whose sform is sheared, its slice axis leaning 15 degrees (SimpleITK places it by the qform, FSL by "
          "the sform)"] = d / "leaning.nii"
    (d / "leaning.nii").write_bytes(leaning)
    damaged = {  # a field of the header set to what a damaged file holds: (offset, struct format, value)
        "NIfTI whose header's first field (its size, 348) is damaged (SimpleITK reads it all the same, unchecked)":
            (0, "<i", -348),
        "NIfTI without the NIfTI mark (`n+1`; SimpleITK would read it as Analyze, on no orientation)":
            (344, "4s", b"n+1 "),
        "NIfTI whose header gives a size of 0 or below along an axis (SimpleITK would read one slice)": (46, "<h", 0),
        "NIfTI whose datatype and bitpix disagree (8-bit voxels of 16 bits: SimpleITK would read half of each)":
            (70, "<2h", 256, 16),
        "NIfTI whose voxels start inside its header (vox_offset below 348: SimpleITK would read the header as voxels)":
            (108, "<f", 0.0),
        "NIfTI holding more voxel data than its header's sizes and type need (a slice too few: SimpleITK would read "
        "the first bytes)": (46, "<h", good.GetDepth() - 1),
        "NIfTI whose sform (or qform) in use holds NaN": (292, "<f", float("nan")),
    }
    for n, (row_id, (offset, layout, *values)) in enumerate(damaged.items()):
        header = bytearray(raw)
        struct.pack_into(layout, header, offset, *values)
        paths[row_id] = d / f"damaged{n}.nii"
        paths[row_id].write_bytes(header)
    for row_id, name, codes, (offset, value) in (
            ("NIfTI whose qform in use is no rotation: a quaternion beyond a unit one's (`quatern_b` 2: the image "
             "library made up a rotation) or a handedness (`pixdim[0]`) of NaN", "quaternion.nii", (1, 0), (256, 2.0)),
            ("NIfTI whose sform holds NaN but is not in use (`sform_code` 0)", "unused_sform.nii", (1, 0),
             (292, float("nan")))):
        header = bytearray(raw)
        struct.pack_into("<2h", header, 252, *codes)
        struct.pack_into("<f", header, offset, value)
        paths[row_id] = d / name
        paths[row_id].write_bytes(header)
    voxels = sitk.GetArrayFromImage(good)  # float32, (k, j, i)
    huge = ("NRRD0004\ntype: float\ndimension: 3\nsizes: {} {} {}\nspace: left-posterior-superior\n"
            "space directions: (1e30,0,0) (0,1e30,0) (0,0,1e30)\nendian: little\nencoding: {}\n\n")
    paths["an image whose voxel size is no MRI's (NRRD `space directions: (1e30,0,0) ...`: an \"ok\" of nonsense "
          "volumes)"] = d / "huge.nrrd"
    (d / "huge.nrrd").write_bytes(huge.format(*voxels.shape[::-1], "raw").encode() + voxels.astype("<f4").tobytes())
    paths["NRRD whose `space origin` is not numbers (`(nan,nan,nan)`: the image library read 0, 0, 0 and the mask "
          "lay elsewhere in the patient), whose `space directions` are not numbers or of length 0 (all NaN read as 1 "
          "mm), or whose `spacings` are infinite or 0"] = d / "unplaced.nrrd"
    (d / "unplaced.nrrd").write_bytes(huge.format(*voxels.shape[::-1], "raw").replace("1e30", "0.9").replace(
        "endian", "space origin: (nan,nan,nan)\nendian").encode() + voxels.astype("<f4").tobytes())
    paths["NRRD of binary voxels whose header says `encoding: ascii` (the NRRD library crashed the process)"] = \
        d / "not_text.nrrd"  # a background of zero bytes: a run of them without a space
    paths["MetaImage whose NDims is no count of axes (-1 hung the image library; 100 or 2147483648 crashed the "
          "process)"] = d / "ndims.mha"
    (d / "ndims.mha").write_bytes("ObjectType = Image\nNDims = 100\nDimSize = {} {} {}\nElementSpacing = 0.9 0.9 5\n"
                                  "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n".format(*voxels.shape[::-1]).encode()
                                  + voxels.astype("<f4").tobytes())
    (d / "not_text.nrrd").write_bytes(huge.format(*voxels.shape[::-1], "ascii").replace("1e30", "0.9").encode()
                                      + np.pad(voxels, 4).astype("<f4").tobytes())
    lean = np.array([0.3, 0.9]) / np.hypot(0.3, 0.9) * good.GetSpacing()[1]  # the j axis leans along x
    sheared = ("NRRD0004\ntype: float\ndimension: 3\nsizes: {} {} {}\nspace: left-posterior-superior\n"
               "space directions: ({},0,0) ({},{},0) (0,0,{})\nendian: little\nencoding: raw\n\n").format(
        *voxels.shape[::-1], good.GetSpacing()[0], *lean, good.GetSpacing()[2])
    paths["a grid whose axes are not at right angles (sheared)"] = d / "sheared.nrrd"
    (d / "sheared.nrrd").write_bytes(sheared.encode() + voxels.astype("<f4").tobytes())
    nrrd = "NRRD0004\ntype: float\ndimension: 3\nsizes: {} {} {}\nendian: little\nencoding: raw\n\n"
    paths["NRRD or MetaImage without a voxel size (SimpleITK would read 1 mm)"] = d / "nospacing.nrrd"
    (d / "nospacing.nrrd").write_bytes(nrrd.format(*voxels.shape[::-1]).encode() + voxels.astype("<f4").tobytes())
    metres_nrrd = ("NRRD0004\ntype: float\ndimension: 3\nsizes: {} {} {}\nspace: left-posterior-superior\n"
                   "space directions: (0.0009,0,0) (0,0.0009,0) (0,0,0.005)\nspace units: \"m\" \"m\" \"m\"\n"
                   "endian: little\nencoding: raw\n\n").format(*voxels.shape[::-1])
    paths["NRRD whose lengths are in m or cm (space units; SimpleITK would read mm)"] = d / "metres.nrrd"
    (d / "metres.nrrd").write_bytes(metres_nrrd.encode() + voxels.astype("<f4").tobytes())
    series = ("NRRD0004\ntype: float\ndimension: 4\nsizes: {} {} {} 2\nspace: left-posterior-superior\n"
              "space directions: (0.9,0,0) (0,0.9,0) (0,0,5) none\nkinds: domain domain domain time\nendian: little\n"
              "encoding: raw\n\n").format(*voxels.shape[::-1])
    paths["NRRD series: a time axis beside three in space (`kinds: domain domain domain time`, its direction "
          "`none`)"] = d / "series.nrrd"
    (d / "series.nrrd").write_bytes(series.encode() + np.concatenate([voxels, voxels]).astype("<f4").tobytes())
    sequence = ("NRRD0004\ntype: float\ndimension: 4\nsizes: 2 {} {} {}\nspace: left-posterior-superior\n"
                "space directions: none (0.9,0,0) (0,0.9,0) (0,0,5)\nkinds: list domain domain domain\nendian: little\n"
                "encoding: raw\n\n").format(*voxels.shape[::-1])
    paths["NRRD of several volumes on a list axis (a 3D Slicer sequence `.seq.nrrd`, a multi-volume or a DWI; "
          "SimpleITK reads a vector image)"] = d / "scans.seq.nrrd"
    (d / "scans.seq.nrrd").write_bytes(sequence.encode() + np.stack([voxels, voxels], -1).astype("<f4").tobytes())
    paths["NRRD or MetaImage whose voxel data file is longer than its header's sizes and type need (a slice too few, "
          "a preamble not skipped: SimpleITK would read the first bytes)"] = d / "fewer.nhdr"
    (d / "fewer.nhdr").write_text(nrrd.format(*voxels.shape[:0:-1], voxels.shape[0] - 1).replace(
        "encoding: raw\n", "spacings: 0.9 0.9 5\nencoding: raw\ndata file: fewer.raw\n"))
    (d / "fewer.raw").write_bytes(voxels.astype("<f4").tobytes())
    sagittal = sitk.Image(good)
    sagittal.SetDirection([0, 0, 1, 1, 0, 0, 0, -1, 0])
    sitk.WriteImage(sagittal, str(d / "sagittal.mha"))
    paths["MetaImage whose AnatomicalOrientation lays the axes along other body axes than its TransformMatrix (a "
          "sagittal scan's matrix written row by row, or left out)"] = d / "sagittal.mha"
    (d / "sagittal.mha").write_bytes(re.sub(rb"TransformMatrix = [^\n]*\n", b"", (d / "sagittal.mha").read_bytes(), 1))
    meta = ("ObjectType = Image\nNDims = {}\n{}DimSize = {}\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    shape = " ".join(str(n) for n in voxels.shape[::-1])
    paths["MetaImage whose TransformMatrix is no matrix of directions (NaN, an axis of length 0 or scaled by the "
          "voxel sizes: refused in the image library's words, or called a sheared grid)"] = d / "no_matrix.mha"
    (d / "no_matrix.mha").write_bytes(re.sub(rb"TransformMatrix = [^\n]*", b"TransformMatrix = nan 0 0 0 1 0 0 0 1",
                                             _write(d / "no_matrix.mha", good).read_bytes(), 1))
    paths["MetaImage of compressed voxels without their true size (CompressedDataSize; SimpleITK would return "
          "leftover memory)"] = d / "packed.mha"
    (d / "packed.mha").write_bytes(meta.format(3, "CompressedData = True\nElementSpacing = 0.9 0.9 5\n", shape).encode()
                                   + zlib.compress(voxels.astype("<f4").tobytes()))
    paths["MetaImage whose ElementSpacing SimpleITK misreads (a 4D file's CenterOfRotation of three values: 1 mm "
          "read)"] = d / "misread.mha"
    three_centre = "Offset = 0 0 0 0\nCenterOfRotation = 0 0 0\nElementSpacing = 0.9 0.9 5 1\n"
    (d / "misread.mha").write_bytes(meta.format(4, three_centre, shape + " 1").encode() + voxels.astype("<f4").tobytes())
    paths["MetaImage of a file per slice naming fewer files than slices (ElementDataFile: a LIST or numbered pattern; "
          "SimpleITK would fill the others with leftover memory)"] = d / "slices.mhd"
    for k, plane in enumerate(voxels[:-1], 1):  # the last slice's file left out of the pattern
        (d / f"slice{k:03d}.raw").write_bytes(plane.astype("<f4").tobytes())
    (d / "slices.mhd").write_text(meta.format(3, "ElementSpacing = 0.9 0.9 5\n", shape).replace(
        "LOCAL", f"slice%03d.raw 1 {voxels.shape[0] - 1} 1"))
    numbers = " ".join(str(v) for v in voxels.ravel())  # float32's shortest text: the same float read back
    text_header = meta.format(3, "BinaryData = False\nElementSpacing = 0.9 0.9 5\n", shape)
    paths["MetaImage with its voxels written as text (BinaryData = False)"] = d / "text.mha"
    (d / "text.mha").write_text(text_header + numbers + "\n")
    paths["MetaImage with its voxels written as text, fewer numbers than voxels (cut short, or a word among them)"] = \
        d / "text_cut.mha"
    (d / "text_cut.mha").write_text(text_header + numbers[:len(numbers) // 2])
    paths["MetaImage with its voxels written as text that its ElementType cannot hold (1.7 or -1 in MET_USHORT)"
          ", or more numbers than voxels (SimpleITK would cut, wrap or ignore them)"] = d / "text_wrong.mha"
    (d / "text_wrong.mha").write_text(text_header.replace("MET_FLOAT", "MET_USHORT") + numbers + "\n")
    paths["NIfTI-2 file"] = d / "two.nii.gz"
    sitk.WriteImage(good, str(d / "pair.hdr"))  # with pair.img
    paths["NIfTI-1 pair (`.hdr` + `.img`, as SPM writes)"] = d / "pair.hdr"
    for ext in (".hdr", ".img"):
        (d / f"zipped{ext}.gz").write_bytes(gzip.compress((d / f"pair{ext}").read_bytes()))
    paths["compressed NIfTI-1 pair (`.hdr.gz` + `.img.gz`)"] = d / "zipped.hdr.gz"
    analyze = bytearray((d / "pair.hdr").read_bytes()[:348])
    analyze[344:348] = bytes(4)  # no "ni1": Analyze 7.5
    (d / "analyze.hdr").write_bytes(bytes(analyze))
    (d / "analyze.img").write_bytes((d / "pair.img").read_bytes())
    paths["Analyze 7.5 pair (`.hdr` + `.img` without the NIfTI mark: no orientation, left and right ambiguous)"] = d / "analyze.hdr"
    (d / "two.nii.gz").write_bytes(gzip.compress(nifti2_of(raw)))
    paths["a file name in upper case (`SCAN.MHA`, `SCAN.NII.GZ`)"] = d / "SCAN.MHA"
    sitk.WriteImage(good, str(d / "scan.mha"))
    (d / "scan.mha").rename(d / "SCAN.MHA")
    sitk.WriteImage(good, str(d / "scan.nrrd"))  # an NRRD renamed by hand: it was called truncated, "copy it again"
    paths["an NRRD file renamed .nii.gz"] = d / "nrrd_named.nii.gz"
    (d / "scan.nrrd").rename(d / "nrrd_named.nii.gz")
    paths["a .nii.gz file renamed .nrrd"] = d / "nifti_named.nrrd"  # it was "cannot be read, check it is complete"
    (d / "nifti_named.nrrd").write_bytes(data)
    paths["gzip-compressed NIfTI named .nii"] = d / "packed.nii"
    (d / "packed.nii").write_bytes(data)
    paths["one-slice volume"] = _write(d / "one.nii.gz", make_volume(size=(32, 32, 1))[0])
    paths["one sagittal slice cut from an axial scan (axial slices 1 pixel wide)"] = _write(
        d / "strip.nii.gz", make_volume(size=(32, 32, 8), spacing=(0.9, 0.9, 5.0))[0][16:17, :, :])
    sagittal = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
    paths["sagittal acquisition"] = _write(d / "sag.nii.gz", make_volume(size=(6, 32, 32), spacing=(5.0, 0.9, 0.9), direction=sagittal)[0])
    paths["axial slices thinner than their pixels (1 x 1 x 0.8 mm)"] = _write(
        d / "thin.nii.gz", make_volume(size=(32, 32, 12), spacing=(1.0, 1.0, 0.8))[0])
    paths["reordered"] = _write(d / "reordered.nii.gz", sitk.DICOMOrient(truth, "PIR"))
    other_grid = sitk.Image(truth)
    other_grid.SetSpacing((0.9, 0.9, 4.0))
    paths["other grid"] = _write(d / "other_grid.nii.gz", other_grid)
    box = sitk.LabelShapeStatisticsImageFilter()
    box.Execute(truth)
    i, j, k, ni, nj, nk = box.GetBoundingBox(1)
    paths["cropped seg"] = io.write_segmentation(truth[i:i + ni, j:j + nj, k:k + nk], d / "truth_cropped.seg.nrrd")
    drawn = sitk.GetArrayFromImage(truth)  # two lesion voxels past the first one's box; its own box starts a column on
    drawn[:, :, i] = 0
    drawn[k, j, i + ni] = drawn[k, j, i + ni + 1] = 1
    other_rater = sitk.GetImageFromArray(drawn)
    other_rater.CopyInformation(truth)
    paths["other rater"] = _write(d / "other_rater.nii.gz", other_rater)
    paths["cropped other rater"] = io.write_segmentation(other_rater[i + 1:i + ni + 2, j:j + nj, k:k + nk],
                                                         d / "other_rater_cropped.seg.nrrd")
    beyond = sitk.ConstantPad(truth, (0, 0, 0), (0, 0, 2))  # two slices more above the scan, two voxels marked there
    beyond[3, 3, truth.GetSize()[2] + 1] = beyond[4, 3, truth.GetSize()[2] + 1] = 1
    paths["beyond"] = _write(d / "beyond.nii.gz", beyond)
    labels = sitk.GetArrayFromImage(truth)
    labels[0, 0, 0] = 7
    labelled = sitk.GetImageFromArray(labels)
    labelled.CopyInformation(truth)
    paths["labels 7"] = _write(d / "labels7.nii.gz", labelled)
    paths["0/255"] = _write(d / "mask255.nii.gz", truth * 255)
    prob = sitk.GetImageFromArray(sitk.GetArrayFromImage(truth).astype(np.float32) * 0.7)
    prob.CopyInformation(truth)
    paths["prob"] = _write(d / "prob.nii.gz", prob)
    empty = sitk.Image(truth) * 0
    paths["empty mask"] = _write(d / "empty_mask.nii.gz", empty)
    paths["0/2"] = _write(d / "mask02.nii.gz", truth * 2)
    off = sitk.GetArrayFromImage(truth).astype(np.float32)  # lesion 0.99999994 and 1.0000001, as float arithmetic leaves it
    off[off == 1] = np.float32(0.99999994)
    off.flat[np.flatnonzero(off)[::2]] = np.float32(1.0000001)
    paths["round-off"] = _write(d / "roundoff.nii.gz", io.like_image(off, truth))
    off[0, 0, 0] = np.nan
    paths["NaN mask"] = _write(d / "nan_mask.nii.gz", io.like_image(off, truth))
    negative = sitk.Cast(truth, sitk.sitkInt16) - 1  # background -1, lesion 0
    paths["negative"] = _write(d / "negative.nii.gz", negative)
    model = tiny_model_file(tmp_path / "model.pt")
    bad_model = tmp_path / "bad_model.pt"
    bad_model.write_bytes(model.read_bytes()[:500])
    import torch

    payload = torch.load(model, weights_only=True)
    payload["format_version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    paths.update(model=model, bad_model=bad_model, newer_model=newer)
    (d / "raters.csv").write_text("case,first,second\nx,a.nii.gz,b.nii.gz\n")
    (d / "train.csv").write_text(f"case,flair,mask\nc1,{paths['good']},{paths['other grid']}\n"
                                 f"c2,{paths['extreme intensities (1e30)']},{paths['truth']}\n")
    return tmp_path, paths


def _set_us_element(folder: Path, tag: bytes, old: int, new: int) -> None:
    """In each file of `folder`, the US element `tag` (implicit VR little endian: tag, length 2, value) `old` made `new`."""
    for path in folder.iterdir():
        data, count = re.subn(re.escape(tag + struct.pack("<IH", 2, old)), tag + struct.pack("<IH", 2, new),
                              path.read_bytes(), count=1)
        assert count == 1, path
        path.write_bytes(data)


def _empty_segs(good: Path, tmp: Path, names) -> None:
    """DeepWML's DICOM SEGs of an empty mask, one file per name in tmp/in/seg, of the `good` scan written as a DICOM
    series (with a Frame of Reference UID) in tmp/in/flair."""
    from DeepWMLLib import dicom_seg

    folder = write_dicom_series(tmp / "in" / "flair", sitk.Cast(sitk.ReadImage(str(good)), sitk.sitkInt16),
                                description="AX FLAIR", extra={"0020|0052": "1.2.3.9"})
    series, _ = io.choose_dicom_series(folder)
    image = io.read_image(folder, series=series)
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(image)
    (tmp / "in" / "seg").mkdir()
    for name in names:
        made = dicom_seg.segmentation(image, mask, series, {"volume_ml": 0.0, "lesion_count": 0})
        io.write_bytes(made.data, tmp / "in" / "seg" / name)


def _command(row_id: str, tmp: Path, p: dict) -> list[str]:
    out = str(tmp / "out")
    seg = ["segment", "-o", out, "--model", str(p["model"]), "--device", "cpu"]
    if row_id == "missing file":
        return seg + [str(tmp / "nope.nii.gz")]
    if row_id in ("corrupt model file", "model file of a newer format"):
        return ["segment", str(p["good"]), "-o", out, "--model", str(p["bad_model" if "corrupt" in row_id else "newer_model"])]
    if row_id.startswith("model file whose weights changed on the way"):
        import zipfile

        with zipfile.ZipFile(p["model"]) as archive:
            record = max(archive.infolist(), key=lambda info: info.file_size)
        data = bytearray(p["model"].read_bytes())
        middle = record.header_offset + 30 + len(record.filename) + 64 + record.file_size // 2
        data[middle:middle + 4] = b"\xff\xff\x7f\x7f"
        (tmp / "copied.pt").write_bytes(bytes(data))
        return ["segment", str(p["good"]), "-o", out, "--model", str(tmp / "copied.pt")]
    if row_id == "another program's PyTorch checkpoint given as the model":
        import argparse

        import torch

        torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, tmp / "theirs.pt")
        return ["segment", str(p["good"]), "-o", out, "--model", str(tmp / "theirs.pt")]
    if row_id == "a bare PyTorch state_dict (network weights only) given as the model":
        import torch

        from DeepWMLLib.model import build_model

        torch.save(build_model({"base_channels": 4, "depth": 1}).state_dict(), tmp / "weights.pt")
        return ["segment", str(p["good"]), "-o", out, "--model", str(tmp / "weights.pt")]
    if row_id.startswith("the run folder of a trained ensemble given as the model"):  # was "put INPUT before --model"
        for k in range(2):
            (tmp / "run" / f"model_{k}").mkdir(parents=True)
            shutil.copy(p["model"], tmp / "run" / f"model_{k}" / "best.pt")
        return ["segment", str(p["good"]), "-o", out, "--model", str(tmp / "run")]
    if row_id == "a scan given with --model (INPUT before it)":
        return ["segment", str(p["good"]), "-o", out, "--model", str(p["model"]), str(p["truth"])]
    if row_id == "the same model given twice in an ensemble":
        return seg[:-2] + [str(p["model"]), "--device", "cpu", str(p["good"])]
    if row_id == "output folder missing":
        return ["segment", str(p["good"]), "-o", str(tmp / "new" / "deeper"), "--model", str(p["model"])]
    if row_id == "output folder read-only":
        ro = tmp / "readonly"
        ro.mkdir()
        os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
        return ["segment", str(p["good"]), "-o", str(ro), "--model", str(p["model"])]
    if row_id == "output disk full":  # the full disk itself: in test_bad_input
        return seg + [str(p["good"])]
    if row_id == "existing outputs":
        (tmp / "out").mkdir()
        (tmp / "out" / "good_wmh.nii.gz").write_bytes(b"earlier result")
        (tmp / "out" / "good_report.json").write_text("{}")
        return seg + [str(p["good"])]
    if row_id == "existing outputs made with other settings (`--threshold`, `--model`, `--tta`...)":
        assert main(seg + [str(p["good"])]) == 0  # a real earlier run, at the model's threshold
        return seg + [str(p["good"]), "--threshold", "0.3"]
    if row_id.startswith("a case done before whose saved mask was"):
        assert main(seg + [str(p["good"])]) == 0  # a real earlier run
        mask = tmp / "out" / "good_wmh.nii.gz"
        saved = sitk.ReadImage(str(mask))
        if "another grid" in row_id:
            changed = sitk.Image([n + 2 for n in saved.GetSize()], sitk.sitkUInt8)
            changed.SetSpacing(saved.GetSpacing())
        else:  # a voxel marked or cleared by hand
            voxels = sitk.GetArrayFromImage(saved)
            voxels[0, 0, 0] = 1 - voxels[0, 0, 0]
            changed = sitk.GetImageFromArray(voxels)
            changed.CopyInformation(saved)
        sitk.WriteImage(changed, str(mask))
        return seg + [str(p["good"]), "--qc"]
    if row_id == "outputs of another scan of the same name in OUTDIR":
        (tmp / "out").mkdir()
        (tmp / "out" / "good_wmh.nii.gz").write_bytes(b"earlier result")
        (tmp / "out" / "good_report.json").write_text(json.dumps({"input": "/elsewhere/good.nii.gz",
                                                                  "input_absolute": "/elsewhere/good.nii.gz"}))
        return seg + [str(p["good"])]
    if row_id == "an output name taken by a scan given (OUTDIR the input folder)":
        own = tmp / "own"
        own.mkdir()
        for name in ("x.nii.gz", "x_wmh.nii.gz"):  # the second: the user's own file of DeepWML's output name
            (own / name).write_bytes(p["good"].read_bytes())
        return ["segment", str(own), "-o", str(own), "--model", str(p["model"]), "--device", "cpu"]
    if row_id == "a file name that is not UTF-8 text":
        latin = tmp / "latin"
        latin.mkdir()
        sitk.WriteImage(sitk.ReadImage(str(p["good"])), str(latin / "plain.nrrd"))
        name = os.path.join(os.fsencode(latin), b"caf\xe9.nrrd")  # from a Latin-1 system: ITK would abort on it
        os.rename(os.fsencode(latin / "plain.nrrd"), name)
        return seg + [os.fsdecode(name)]
    if row_id == "a case name too long for its output file names":
        long = tmp / "long"
        long.mkdir()
        return seg + [str(_write(long / ("b" * 246 + ".nii.gz"), sitk.ReadImage(str(p["good"]))))]
    if row_id == "a link to a file that cannot be reached":
        (tmp / "links").mkdir()
        (tmp / "links" / "scan.nii.gz").symlink_to(tmp / "unmounted share" / "scan.nii.gz")
        return seg + [str(tmp / "links" / "scan.nii.gz")]
    if row_id.startswith("an earlier run killed outright while writing the case"):  # its picture, listed by its
        # journal alone: a run without --qc would have kept it beside a new result, a --qc run taken it for its own
        (tmp / "out").mkdir()
        (tmp / "out" / "good_qc.png").write_bytes(b"earlier result")
        (tmp / "out" / ".good_report.deepwml-journal").write_text(json.dumps(
            {"report": "good_report.json", "case": "good", "outputs": ["good_qc.png", "good_report.json",
                                                                       "good_wmh.nii.gz"]}))
        return seg + [str(p["good"])]
    if row_id.startswith("an earlier run's outputs without its report"):
        (tmp / "out").mkdir()
        (tmp / "out" / "good_wmh.nii.gz").write_bytes(b"earlier result")
        return seg + [str(p["good"])]
    if row_id == "--device cuda without a GPU":
        return ["segment", str(p["good"]), "-o", out, "--model", str(p["model"]), "--device", "cuda"]
    if row_id.startswith("a --backend whose runtime is not installed"):
        return ["segment", str(p["good"]), "-o", out, "--model", str(p["model"]), "--device", "cpu", "--backend",
                "openvino"]
    if row_id.startswith("--precision bf16 on a CPU without native bf16"):
        return ["segment", str(p["good"]), "-o", out, "--model", str(p["model"]), "--device", "cpu", "--precision",
                "bf16"]
    if row_id == "threshold outside (0, 1)":
        return seg + [str(p["good"]), "--threshold", "1.5"]
    if row_id == "batch size 0":
        return seg + [str(p["good"]), "--batch-size", "0"]
    if row_id == "INPUT after --model (taken as a model file)":
        return ["segment", "-o", out, "--model", str(p["model"]), str(p["good"])]
    if row_id == "a --model name that is no file nor a shipped model or ensemble (a typo)":
        return ["segment", str(p["good"]), "-o", out, "--model", "ensemble-v9"]
    if row_id == "--no-location with --ventricle-model":
        return seg + [str(p["good"]), "--no-location", "--ventricle-model", str(p["model"])]
    if row_id == "--save-ventricle-mask without a ventricle model":
        return seg + [str(p["good"]), "--save-ventricle-mask"]
    if row_id == "a ventricle model given as the WMH model":
        vent = tiny_model_file(tmp / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
        return ["segment", str(p["good"]), "-o", out, "--model", str(vent)]
    if row_id.startswith("a lesion mask labelled one value per lesion"):
        truth = sitk.ReadImage(str(p["truth"]))
        array = np.zeros(sitk.GetArrayViewFromImage(truth).shape, np.uint16)
        for label in range(1, 25):  # 24 small lesions, one label each (a connected-component tool's output)
            z, y, x = label % array.shape[0], 4 + (label * 5) % (array.shape[1] - 8), 4 + (label * 3) % (array.shape[2] - 8)
            array[z, y:y + 3, x:x + 3] = label
        labels = sitk.GetImageFromArray(array)
        labels.CopyInformation(truth)
        sitk.WriteImage(labels, str(tmp / "in" / "lesion_labels.nii.gz"))
        return seg + [str(tmp / "in" / "lesion_labels.nii.gz")]
    if row_id == "a lesion mask given as the FLAIR":
        return seg + [str(p["truth"])]
    if row_id.startswith("a lesion mask found beside its FLAIR"):
        (tmp / "in" / "labelled").mkdir()
        for name in ("good", "truth"):
            (tmp / "in" / "labelled" / f"{name}.nii.gz").write_bytes(p[name].read_bytes())
        return seg + [str(tmp / "in" / "labelled")]
    if row_id.startswith("a lesion mask named beside its FLAIR"):
        (tmp / "in" / "patient07").mkdir()
        for name in ("good", "truth"):
            (tmp / "in" / "patient07" / f"{name}.nii.gz").write_bytes(p[name].read_bytes())
        return seg + sorted(str(path) for path in (tmp / "in" / "patient07").iterdir())  # as the shell expands it
    if row_id.startswith("a folder holding only label masks"):
        (tmp / "in" / "masks").mkdir()
        (tmp / "in" / "masks" / "truth.nii.gz").write_bytes(p["truth"].read_bytes())
        return seg + [str(tmp / "in" / "masks")]
    if row_id.startswith("a Slicer segmentation (`.seg.nrrd`)"):
        (tmp / "in" / "sliced").mkdir()
        sitk.WriteImage(sitk.ReadImage(str(p["good"])), str(tmp / "in" / "sliced" / "case01.nrrd"))
        sitk.WriteImage(sitk.ReadImage(str(p["truth"])), str(tmp / "in" / "sliced" / "case01.seg.nrrd"))
        return seg + [str(tmp / "in" / "sliced")]
    if row_id == "a DICOM study folder with two FLAIR-like series":
        for number, description in enumerate(("AX FLAIR", "AX FLAIR post"), start=1):
            write_dicom_series(tmp / "in" / "study", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                               uid=f"1.2.{number}", description=description, prefix=f"s{number}_")
        return seg + [str(tmp / "in" / "study")]
    if row_id == "--series naming no series of the DICOM folder given (or of none of the folders given)":
        for number, description in enumerate(("AX FLAIR", "AX T1"), start=1):
            write_dicom_series(tmp / "in" / "study", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                               uid=f"1.2.{number}", description=description, prefix=f"s{number}_")
        return seg + [str(tmp / "in" / "study"), "--series", "T2"]
    if row_id.startswith("a DICOM series with a slice missing"):
        folder = write_dicom_series(tmp / "in" / "gap", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        (folder / "slice002.dcm").unlink()
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series without Pixel Spacing"):
        folder = write_dicom_series(tmp / "in" / "capture", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        drop_pixel_spacing(folder)
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series whose Image Orientation (Patient) is missing"):
        folder = write_dicom_series(tmp / "in" / "unturned", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        set_orientation(folder, "0\\0\\0\\0\\1\\0")
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series whose Samples per Pixel is 0"):
        folder = write_dicom_series(tmp / "in" / "zero", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        _set_us_element(folder, b"\x28\x00\x02\x00", 1, 0)  # Samples per Pixel (0028,0002) 1 made 0
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series compressed in a transfer syntax GDCM cannot decode"):
        folder = write_dicom_series(tmp / "in" / "jpegxl", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        relabel_transfer_syntax(folder, "1.2.840.10008.1.2.4.110")
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series whose Rows do not fit its Pixel Data"):
        folder = write_dicom_series(tmp / "in" / "halved", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        _set_us_element(folder, b"\x28\x00\x10\x00", 32, 16)  # Rows (0028,0010) 32 made 16
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series in explicit VR big endian whose Rows do not fit"):
        return seg + [str(encoded_dicom_series(tmp / "in" / "bigendian", sitk.Cast(sitk.ReadImage(str(p["good"])),
                                                                                     sitk.sitkInt16),
                                               "1.2.840.10008.1.2.2", rows=16))]
    if row_id.startswith("a DICOM series whose Columns is one too small"):
        image, _ = make_volume(size=(64, 48, 5))
        folder = write_dicom_series(tmp / "in" / "sheared", sitk.Cast(image, sitk.sitkInt16), description="AX FLAIR")
        _set_us_element(folder, b"\x28\x00\x11\x00", 64, 63)  # Columns (0028,0011) 64 made 63
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series whose Pixel Data holds padding past its pixels"):
        folder = write_dicom_series(tmp / "in" / "padded", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        for path in folder.iterdir():  # Pixel Data, the last element (implicit VR), 1000 bytes of zeros longer
            data = path.read_bytes()
            at = data.rindex(b"\xe0\x7f\x10\x00")
            length = struct.unpack_from("<I", data, at + 4)[0]
            path.write_bytes(data[:at + 4] + struct.pack("<I", length + 1000) + data[at + 8:] + bytes(1000))
        return seg + [str(folder)]
    if row_id.startswith("a DICOM folder whose T1 series holds a file labelled Explicit VR Big Endian"):
        folder = write_dicom_series(tmp / "in" / "study", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    uid="1.2.3.4.1", description="AX FLAIR", prefix="flair")
        t1, _ = make_volume(size=(32, 32, 4), seed=5)
        write_dicom_series(folder, sitk.Cast(t1, sitk.sitkInt16), uid="1.2.3.4.2", description="AX T1", prefix="t1_")
        relabel_transfer_syntax(folder, "1.2.840.10008.1.2.2", names=["t1_001.dcm"])
        return seg + [str(folder)]
    if row_id.startswith("a DICOM series some of whose files are labelled Explicit VR Big Endian"):
        folder = write_dicom_series(tmp / "in" / "mislabelled", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                                    description="AX FLAIR")
        relabel_transfer_syntax(folder, "1.2.840.10008.1.2.2", names=sorted(path.name for path in folder.iterdir())[1::3])
        return seg + [str(folder)]
    if row_id == "--dicom-outline with a NIfTI input":
        return seg + [str(p["good"]), "--dicom-outline"]
    if row_id == "--dicom-seg with a NIfTI input":
        return seg + [str(p["good"]), "--dicom-seg"]
    if row_id == "--dicom-seg with a DICOM series without a Frame of Reference UID":
        write_dicom_series(tmp / "in" / "flair", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                           description="AX FLAIR")  # (0020,0052) not written
        return seg + [str(tmp / "in" / "flair"), "--dicom-seg"]
    if row_id.startswith("a folder holding only a DICOM SEG"):
        _empty_segs(p["good"], tmp, ("seg.dcm",))
        return seg + [str(tmp / "in" / "seg")]
    if row_id.startswith("a folder holding two DICOM SEGs"):
        _empty_segs(p["good"], tmp, ("rater_a.dcm", "rater_b.dcm"))
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(tmp / "in" / "seg")]
    if row_id.startswith(("a DICOM SEG given as the reference", "a LABELMAP DICOM SEG given as the reference")):
        from DeepWMLLib import dicom_seg

        scan = sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16)
        extra = {"0020|0052": "1.2.3.9"}
        flair = io.read_image(write_dicom_series(tmp / "in" / "flair", scan, description="AX FLAIR", extra=extra))
        positions = [scan.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(scan.GetDepth())]
        if "between" in row_id:  # the SEG made of a series whose slice 4 lies half a slice up
            normal = np.array(scan.GetDirection()).reshape(3, 3)[:, 2]
            positions[4] = tuple(np.array(positions[4]) + 0.5 * scan.GetSpacing()[2] * normal)
        source = write_dicom_series(tmp / "in" / "source", scan, uid="1.2.3.4.6", description="AX FLAIR", extra=extra,
                                    positions=positions)
        made = dicom_seg.segmentation(flair, io.read_mask(p["truth"]), io.choose_dicom_series(source)[0],
                                      {"volume_ml": 0.0, "lesion_count": 0})
        (tmp / "in" / "seg").mkdir()
        if "compressed by JPEG 2000" in row_id:  # (its file meta says JPEG 2000 Lossless: its pixels are not looked at)
            io.write_bytes(made.data, tmp / "in" / "seg" / "rater.dcm")
            relabel_transfer_syntax(tmp / "in" / "seg", "1.2.840.10008.1.2.4.90", names=["rater.dcm"])
            return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(tmp / "in" / "seg" / "rater.dcm")]
        io.write_bytes(made.data, tmp / "in" / "seg" / "IM0001")
        if "RLE Lossless (" in row_id or "RLE Lossless with each frame split" in row_id or "LABELMAP" in row_id:
            _recoded_seg(tmp / "in" / "seg" / "IM0001", "LABELMAP" in row_id, 300 if "cannot hold" in row_id else 1,
                         split="split over two fragments" in row_id)
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(tmp / "in" / "seg"), "--json",
                str(tmp / "e.json")]
    if row_id == "change --dicom-seg with a DICOM follow-up without a Frame of Reference UID":
        write_dicom_series(tmp / "in" / "followup", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                           description="AX FLAIR")  # (0020,0052) not written
        return ["change", str(p["extreme intensities (1e30)"]), str(tmp / "in" / "followup"), "-o", out,
                "--baseline-mask", str(p["truth"]), "--followup-mask", str(p["truth"]), "--dicom-seg"]
    if row_id == "--dicom-outline where the outline folder holds other files":
        write_dicom_series(tmp / "in" / "flair", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                           description="AX FLAIR")
        (tmp / "out" / "flair_outline_dicom").mkdir(parents=True)
        (tmp / "out" / "flair_outline_dicom" / "notes.txt").write_text("mine")
        return seg + [str(tmp / "in" / "flair"), "--dicom-outline", "--overwrite"]
    if row_id.startswith("--dicom-outline --overwrite where the outline folder holds a FLAIR's images"):
        write_dicom_series(tmp / "in" / "flair", sitk.Cast(sitk.ReadImage(str(p["good"])), sitk.sitkInt16),
                           description="AX FLAIR", prefix="IM")
        shutil.copytree(tmp / "in" / "flair", tmp / "out" / "flair_outline_dicom")
        return seg + [str(tmp / "in" / "flair"), "--dicom-outline", "--overwrite"]
    if row_id.startswith(("a probability map of an earlier run", "an earlier run's OUTDIR given")):
        assert main(["segment", str(p["good"]), "-o", str(tmp / "earlier"), "--model", str(p["model"]), "--device",
                     "cpu", "--save-probabilities"]) == 0
        return seg + [str(tmp / "earlier" / ("good_prob.nii.gz" if row_id.startswith("a probability") else ""))]
    if row_id.startswith("a scan whose brightest voxels wrapped around to negative"):
        scan = sitk.ReadImage(str(p["good"]))
        scaled = np.round(sitk.GetArrayFromImage(scan).astype(np.float64) * 60).astype(np.int64)  # tissue 18000
        wrapped = sitk.GetImageFromArray(((scaled + 32768) % 65536 - 32768).astype(np.int16))  # lesions over 32767
        wrapped.CopyInformation(scan)
        return seg + [str(_write(tmp / "in" / "wrapped.nii.gz", wrapped))]
    if row_id.startswith("a scan whose brightest voxels wrapped around past 65535"):
        scan, truth = sitk.ReadImage(str(p["good"])), sitk.ReadImage(str(p["truth"]))
        scaled = np.round(sitk.GetArrayFromImage(scan).astype(np.float64) * 200).astype(np.int64)  # tissue 60000
        scaled[sitk.GetArrayFromImage(truth) > 0] = 70000  # lesions over 65535
        wrapped = sitk.GetImageFromArray((scaled % 65536).astype(np.uint16))
        wrapped.CopyInformation(scan)
        return seg + [str(_write(tmp / "in" / "wrapped_unsigned.nii.gz", wrapped))]
    if row_id.startswith("a scan exported in a display window"):
        scan = sitk.ReadImage(str(p["good"]))
        voxels = sitk.GetArrayFromImage(scan).astype(np.float64)
        # a fifth of its upper part cut (about 400 of its 5120 voxels: a small volume, CLIPPED_VOXELS_MIN is 100)
        cut = np.percentile(voxels[voxels > np.percentile(voxels, 60)], 80)
        windowed = sitk.GetImageFromArray((np.clip(voxels / cut, 0, 1) * 255).round().astype(np.uint8))
        windowed.CopyInformation(scan)
        return seg + [str(_write(tmp / "in" / "windowed.nii.gz", windowed))]
    if row_id.startswith("a scan with a bright line through every slice"):
        zipper = sitk.ReadImage(str(p["good"]))
        voxels = sitk.GetArrayFromImage(zipper)
        voxels[:, :, 20] += 0.2 * voxels.max()  # the same column of every slice, through head and air
        striped = sitk.GetImageFromArray(voxels)
        striped.CopyInformation(zipper)
        return seg + [str(_write(tmp / "in" / "zipper.nii.gz", striped))]
    if row_id == "a T1-weighted scan given as the FLAIR":  # the shipped models: the check judges what they mark
        return ["segment", str(_t1_scan(tmp / "in")), "-o", out, "--device", "cpu"]
    if row_id.startswith("a T1-weighted scan given as the FLAIR with --no-brain-mask"):
        return ["segment", str(_t1_scan(tmp / "in")), "-o", out, "--device", "cpu", "--no-brain-mask"]
    if row_id in ("output folder is a file", "synthetic data into a file"):
        (tmp / "afile").write_text("not a folder")
        if row_id.startswith("synthetic"):
            return ["synth", "-n", "1", "-o", str(tmp / "afile")]
        return ["segment", str(p["good"]), "-o", str(tmp / "afile"), "--model", str(p["model"])]
    if row_id == "--init model of another architecture":
        return ["train", str(tmp / "in" / "train.csv"), "--run-dir", str(tmp / "run"), "--base-channels", "8",
                "--depth", "2", "--init", str(p["model"])]
    if row_id == "one scan under two case names":
        (tmp / "twice.csv").write_text(f"case,flair,mask\nc1,{p['good']},{p['truth']}\nc2,{p['good']},{p['truth']}\n")
        return ["train", str(tmp / "twice.csv"), "--run-dir", str(tmp / "run")]
    if row_id == "a T1-weighted scan given as a training case's FLAIR":  # the shipped brain-mask network outlines it
        t1 = _t1_scan(tmp / "in")
        marked = sitk.Image(sitk.ReadImage(str(t1)).GetSize(), sitk.sitkUInt8)
        marked.CopyInformation(sitk.ReadImage(str(t1)))
        marked[90, 100, 15] = 1
        (tmp / "t1.csv").write_text(f"case,flair,mask\nc1,{p['good']},{p['truth']}\n"
                                    f"c2,{t1},{_write(tmp / 'in' / 't1_mask.nii.gz', marked)}\n")
        return ["train", str(tmp / "t1.csv"), "--run-dir", str(tmp / "run"), "--base-channels", "4", "--depth", "2"]
    if row_id == "training run folder given is a file":
        (tmp / "taken").write_text("a note")
        return ["train", str(tmp / "in" / "train.csv"), "--run-dir", str(tmp / "taken")]
    if row_id == "training option out of range (--epochs 0)":
        return ["train", str(tmp / "in" / "train.csv"), "--run-dir", str(tmp / "run"), "--epochs", "0"]
    if row_id == "evaluate without a case":
        return ["evaluate", "--json", str(tmp / "e.json")]
    if row_id.startswith(("scans of one name in folders of their own", "two scans of one name in one folder",
                          "two scans in one folder whose names differ only in upper/lower case")):
        return seg + [str(x) for x in p[row_id]]
    if row_id.startswith("a case's folder given as the reference"):  # was "a folder without ... image files"
        folder = tmp / "patient07"
        folder.mkdir()
        shutil.copy(p["good"], folder / "flair.nii.gz")
        shutil.copy(p["truth"], folder / "consensus_mask.nii.gz")
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(folder)]
    if row_id.startswith("a mask file made of an array with its axes swapped"):
        truth = sitk.ReadImage(str(p["truth"]))
        swapped = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(truth).transpose()))
        swapped.SetSpacing(truth.GetSpacing())  # what a script that saved nibabel's (x, y, z) array writes
        swapped.SetOrigin(truth.GetOrigin())
        swapped.SetDirection(truth.GetDirection())
        return ["evaluate", "--prediction", str(_write(tmp / "in" / "swapped.nii.gz", swapped)), "--reference",
                str(p["truth"])]
    if row_id == "reference on another grid":
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["other grid"])]
    if row_id == "reference storing the same grid in another voxel order":
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["reordered"]), "--json", str(tmp / "e.json")]
    if row_id.startswith("reference saved cropped to its lesions"):
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["cropped seg"]), "--json", str(tmp / "e.json")]
    if row_id == "reference mixing lesion labels (1 and 7)":
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["labels 7"])]
    if row_id == "two-valued 0/255 reference":
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["0/255"]), "--json", str(tmp / "e.json")]
    if row_id.startswith("a float mask whose lesion value is 1 but for float round-off"):
        return ["evaluate", "--prediction", str(p["round-off"]), "--reference", str(p["truth"]), "--json", str(tmp / "e.json")]
    if row_id == "a NIfTI mask with NaN voxels":
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["NaN mask"])]
    if row_id.startswith("a reference given as a Slicer segmentation (`.seg.nrrd`) whose `space origin`"):
        seg_file = io.write_segmentation(sitk.ReadImage(str(p["truth"])), tmp / "in" / "unplaced.seg.nrrd")
        seg_file.write_bytes(re.sub(rb"space origin: [^\n]*", b"space origin: (nan,nan,nan)", seg_file.read_bytes(), count=1))
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(seg_file)]
    if row_id == "probability map as mask":
        return ["evaluate", "--prediction", str(p["prob"]), "--reference", str(p["truth"])]
    if row_id.startswith("the FLAIR given as the probability map"):  # its intensities gave a plausible ROC AUC
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["truth"]), "--probabilities",
                str(p["good"])]
    if row_id.startswith("a picture asked for under another format's name"):  # a .jpg of PNG data was written
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["truth"]), "--flair", str(p["good"]),
                "--qc", str(tmp / "case.jpg")]
    if row_id == "empty prediction and reference":
        return ["evaluate", "--prediction", str(p["empty mask"]), "--reference", str(p["empty mask"]), "--json", str(tmp / "e.json")]
    if row_id == "rater masks on different grids":
        return ["consensus", str(p["truth"]), str(p["other grid"])]
    if row_id == "two rater masks each saved cropped to its own lesions":
        return ["consensus", str(p["cropped seg"]), str(p["cropped other rater"]), "--json", str(tmp / "c.json")]
    if row_id.startswith("a reference of 0 and 2 only"):
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["0/2"])]
    if row_id in ("an 8-bit FLAIR given as the prediction", "a 16-bit FLAIR given as the reference"):
        # the 8-bit one was read as lesion labels (the whole head lesion, Dice near 0, no word), the 16-bit one
        # told to "relabel it"
        eight = "8-bit" in row_id
        scan = sitk.RescaleIntensity(sitk.ReadImage(str(p["good"])), 0, 255 if eight else 1000)
        scan = _write(tmp / "in" / "flair_as_mask.nii.gz", sitk.Cast(scan, sitk.sitkUInt8 if eight else sitk.sitkUInt16))
        first, second = (scan, p["truth"]) if eight else (p["truth"], scan)
        return ["evaluate", "--prediction", str(first), "--reference", str(second)]
    if row_id == "a mask with negative values (int16)":
        return ["evaluate", "--prediction", str(p["negative"]), "--reference", str(p["truth"])]
    if row_id == "an empty reference":
        return ["evaluate", "--prediction", str(p["truth"]), "--reference", str(p["empty mask"]), "--json", str(tmp / "e.json")]
    if row_id == "consensus manifest missing columns":
        return ["consensus", "--manifest", str(tmp / "in" / "raters.csv"), "-o", out]
    if row_id == "baseline and follow-up the same file":
        return ["change", str(p["good"]), str(p["good"]), "-o", out]
    if row_id == "a baseline mask on another grid":
        return ["change", str(p["good"]), str(p["extreme intensities (1e30)"]), "-o", out, "--baseline-mask",
                str(p["other grid"]), "--followup-mask", str(p["truth"])]
    if row_id == "a baseline mask on the scan's voxels with lesion voxels beyond the scan's extent":
        return ["change", str(p["good"]), str(p["extreme intensities (1e30)"]), "-o", out, "--baseline-mask",
                str(p["beyond"]), "--followup-mask", str(p["truth"])]
    if row_id == "a follow-up mask saved cropped to its lesions on the follow-up's voxels":
        return ["change", str(p["extreme intensities (1e30)"]), str(p["good"]), "-o", out, "--baseline-mask",
                str(p["truth"]), "--followup-mask", str(p["cropped seg"])]
    if row_id == "the baseline's and the follow-up's masks given the wrong way round":
        # was told the grids differ and to resample one mask onto the other scan's grid
        later, later_mask = make_volume(size=(30, 34, 8), spacing=(0.8, 0.8, 3.0))
        later, later_mask = _write(tmp / "in" / "later.nii.gz", later), _write(tmp / "in" / "later_mask.nii.gz", later_mask)
        return ["change", str(p["good"]), str(later), "-o", out, "--baseline-mask", str(later_mask), "--followup-mask",
                str(p["truth"])]
    if row_id == "change --device cuda without a GPU":
        return ["change", str(p["good"]), str(p["extreme intensities (1e30)"]), "-o", out, "--model", str(p["model"]),
                "--device", "cuda"]
    if row_id == "change --precision bf16 on a CPU without native bf16":
        return ["change", str(p["good"]), str(p["extreme intensities (1e30)"]), "-o", out, "--model", str(p["model"]),
                "--device", "cpu", "--precision", "bf16"]
    if row_id.startswith("change: a brain-mask model given as the WMH model"):
        brain = tiny_model_file(tmp / "brain.pt", labels={"0": "background", "1": "intracranial"})
        return ["change", str(p["good"]), str(p["extreme intensities (1e30)"]), "-o", out, "--model", str(brain)]
    if row_id == "both masks given with --model":
        return ["change", str(p["good"]), str(p["extreme intensities (1e30)"]), "-o", out, "--baseline-mask",
                str(p["truth"]), "--followup-mask", str(p["truth"]), "--model", str(p["model"])]
    if row_id.startswith("export"):
        export = ["export", str(p["good"]), str(p["truth"]), "-o", out]
        if row_id.startswith("export: a mask on another grid"):
            return ["export", str(p["good"]), str(p["other grid"]), "-o", out]
        if row_id.startswith("export: DeepWML's DICOM SEG of another"):
            from conftest import stepped_positions
            from test_dicom_seg import PATIENT, make_seg, phantom

            image = phantom(spacing=(0.7, 0.9, 5.0))
            steps = [5.0, 5.6, 4.4, 5.0, 5.8, 4.2]
            for name, uid in (("a", "1.2.3.4.5"), ("b", "1.2.3.4.6")):
                write_dicom_series(tmp / "in" / name, image, uid=uid, description="AX T2 FLAIR", extra=PATIENT,
                                   positions=stepped_positions(image, steps))
            make_seg(tmp / "in" / "a", tmp / "in" / "a_seg.dcm")
            return ["export", str(tmp / "in" / "b"), str(tmp / "in" / "a_seg.dcm"), "-o", out]
        if row_id.startswith("export into"):
            (tmp / "out").mkdir()
            (tmp / "out" / "good_report.json").write_text(json.dumps({"source": "export"}))
            return export
        if row_id.startswith("export --overwrite"):
            (tmp / "out").mkdir()
            (tmp / "out" / "good_report.json").write_text(json.dumps({"model": ["m"]}))
            return export + ["--overwrite"]
        if row_id.startswith("export --case"):
            return export + ["--case", "../up"]
        if row_id.startswith("export --creator"):
            return export + ["--dicom-seg", "--creator", "Doe^Jane^M^Dr^PhD^Extra"]
        if row_id.startswith("export: a WMH model given as --brain-model"):
            vent = tiny_model_file(tmp / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
            return export + ["--ventricle-model", str(vent), "--brain-model", str(p["model"])]
        if row_id.startswith("export --no-brain-mask"):
            return export + ["--no-brain-mask"]
        if row_id.startswith("export --brain-model"):
            return export + ["--brain-model", str(p["model"]), "--no-location"]
        if row_id.startswith("export --no-location"):
            return export + ["--no-location", "--ventricle-model", str(p["model"])]
        if row_id.startswith("export --device cuda"):
            vent = tiny_model_file(tmp / "vent.pt", labels={"0": "background", "1": "lateral_ventricles"})
            return export + ["--ventricle-model", str(vent), "--device", "cuda"]
        return export + ["--dicom-seg"]
    if row_id.startswith("a model without batch normalisation given to adapt"):
        return ["adapt", "--model", str(p["model"]), "--scans", str(p["good"]), "-o", out]
    if row_id == "training manifest missing":
        return ["train", str(tmp / "nope.csv"), "--run-dir", str(tmp / "run")]
    if row_id == "a scan given as the training manifest":  # was "not a readable CSV ...: save it as UTF-8 CSV"
        return ["train", str(p["good"]), "--run-dir", str(tmp / "run")]
    if row_id == "training mask on another grid":
        return ["train", str(tmp / "in" / "train.csv"), "--run-dir", str(tmp / "run"), "--base-channels", "4", "--depth", "2"]
    return seg + [str(p[row_id])]


def _t1_scan(folder: Path) -> Path:
    """nilearn's MNI152 T1 template (real T1 contrast) on 5 mm axial slices."""
    return _write(folder / "t1.nii.gz", mni_t1_thick(5))


def _hashes(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _recoded_seg(path, labelmap: bool, number: int = 1, split: bool = False) -> None:
    """DeepWML's BINARY SEG at `path` rewritten by pydicom: its frames RLE Lossless (pydicom's encoder, each
    frame's bits packed; `split`: each frame over two fragments, a Basic Offset Table saying where each begins), or as a LABELMAP SEG element by element (SOP class, Segmentation Type, 8 bits a pixel,
    each its segment's number, no Segment Identification, segment 0 the background)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate
    from pydicom.pixels.encoders import RLELosslessEncoder
    from pydicom.pixels.utils import pack_bits

    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns).astype(np.uint8)
    if labelmap:
        numbers = [int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                   for g in ds.PerFrameFunctionalGroupsSequence]
        assert len(ds.SegmentSequence) == 1 and set(numbers) == {1}  # (one segment: a frame a slice)
        for group in ds.PerFrameFunctionalGroupsSequence:
            del group.SegmentIdentificationSequence
        background = pydicom.Dataset()
        background.SegmentNumber, background.SegmentLabel, background.SegmentAlgorithmType = 0, "Background", "MANUAL"
        ds.SegmentSequence.insert(0, background)
        ds.SegmentSequence[1].SegmentNumber = number  # (300: more than 8-bit pixels hold)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = io.LABEL_MAP_SEGMENTATION_STORAGE
        ds.SegmentationType, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "LABELMAP", 8, 8, 7
        ds.PixelData = frames.tobytes()
        ds["PixelData"].VR = "OB"
    else:
        fragments = [RLELosslessEncoder.encode(
            pack_bits(frame), rows=1, columns=len(pack_bits(frame)), samples_per_pixel=1, bits_allocated=8,
            bits_stored=8, pixel_representation=0, photometric_interpretation="MONOCHROME2", number_of_frames=1)
            for frame in frames]
        ds.PixelData = encapsulate(fragments, fragments_per_frame=2, has_bot=True) if split else encapsulate(fragments)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("row_id,command,exit_code,words", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input(row_id, command, exit_code, words, world, capsys, monkeypatch):
    import torch

    if "--device cuda without a GPU" in row_id and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if row_id == "output folder read-only" and os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    tmp, paths = world
    argv = _command(row_id, tmp, paths)
    assert argv[0] == command
    before = _hashes(tmp / "in")
    if row_id == "output disk full":  # every write fails as on a full disk (a file system without mounts here)
        def no_space(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(io, "_sync", no_space)
    if row_id.startswith("a --backend whose runtime is not installed"):  # OpenVINO as if not installed
        import importlib.util

        from DeepWMLLib import inference

        def no_openvino():
            raise ImportError("No module named 'openvino'")

        monkeypatch.setattr(inference, "_import_openvino", no_openvino)
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    if "--precision bf16 on a CPU without native bf16" in row_id:  # whatever this CPU computes: its runtimes asked
        from DeepWMLLib import inference

        monkeypatch.setattr(inference, "torch_cpu_has_native_bf16", lambda: False)
        monkeypatch.setattr(inference, "_openvino_computes_bf16", lambda core: False)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    err, printed = captured.err, captured.out
    assert code == exit_code, err
    assert "Traceback" not in err
    if not words.startswith("ok"):
        assert words in err, err
        problem_lines = [line for line in err.splitlines() if "error" in line]
        assert problem_lines and all(len(line) < 700 for line in problem_lines)
    assert _hashes(tmp / "in") == before  # inputs never modified
    for folder in (tmp / "out", tmp / "new" / "deeper"):
        if folder.is_dir():
            assert not [p.name for p in folder.iterdir() if p.name.startswith(".")  # no temporary leftovers
                        and not (row_id.startswith("an earlier run killed outright") and io.is_journal(p.name))]
    if row_id == "existing outputs" or row_id.startswith("an earlier run's outputs without its report") \
            or row_id == "outputs of another scan of the same name in OUTDIR":
        assert (tmp / "out" / "good_wmh.nii.gz").read_bytes() == b"earlier result"
    if row_id.startswith("an earlier run killed outright while writing the case"):  # refused, nothing touched
        assert (tmp / "out" / "good_qc.png").read_bytes() == b"earlier result"
        assert (tmp / "out" / ".good_report.deepwml-journal").exists() and "--overwrite" in err
        assert not (tmp / "out" / "good_wmh.nii.gz").exists()
    if row_id == "an output name taken by a scan given (OUTDIR the input folder)":
        assert (tmp / "own" / "x_wmh.nii.gz").read_bytes() == paths["good"].read_bytes()
    if row_id == "output folder missing":
        assert (tmp / "new" / "deeper" / "good_wmh.nii.gz").is_file()
    if row_id == "MetaImage with its voxels written as text (BinaryData = False)":
        assert (sitk.GetArrayFromImage(io.read_image(paths[row_id])) == sitk.GetArrayFromImage(io.read_image(
            paths["good"]))).all() and (tmp / "out" / "text_wmh.mha").is_file()
    if row_id == "output disk full":  # the case and summary.csv both said so, and nothing written stays
        assert "good: error - cannot write" in err and "error: cannot write" in err.splitlines()[-1]
        assert list((tmp / "out").iterdir()) == []
    if row_id == "the same model given twice in an ensemble":
        assert "model.pt is given 2 times: the ensemble averages it in 2 times (weight 2/2)" in err
        assert json.loads((tmp / "out" / "good_report.json").read_text(encoding="utf-8"))["model"] == ["model.pt"] * 2
    if row_id == "--init model of another architecture":
        assert not (tmp / "run").exists()  # refused before the run folder recorded a config
    if row_id in REFUSED_BY_OPTIONS:  # refused before OUTDIR was made (an empty one was left) or a scan read
        assert not (tmp / "out").exists(), sorted(p.name for p in (tmp / "out").iterdir())
    if row_id == "existing outputs made with other settings (`--threshold`, `--model`, `--tta`...)":
        assert "--threshold (0.5 then, 0.3 now)" in err  # the setting named, with both values
    if row_id.startswith("a case done before whose saved mask was"):  # nothing added, the report as it was
        assert not (tmp / "out" / "good_qc.png").exists() and "--overwrite" in err
        assert "outputs_added" not in json.loads((tmp / "out" / "good_report.json").read_text(encoding="utf-8"))
    if row_id.startswith("a lesion mask found beside its FLAIR"):
        lines = (tmp / "out" / "summary.csv").read_text(encoding="utf-8-sig").splitlines()
        summary = {r["case"]: r for r in csv.DictReader(lines)}
        assert summary["good"]["status"] == "ok" and summary["truth"]["status"] == "skipped"
        assert "looks like a label mask" in summary["truth"]["error"] and "truth: skipped - looks like a label mask" in err
    if row_id.startswith("a lesion mask named beside its FLAIR"):
        lines = (tmp / "out" / "summary.csv").read_text(encoding="utf-8-sig").splitlines()
        summary = {r["case"]: r for r in csv.DictReader(lines)}
        assert summary["good"]["status"] == "ok" and summary["truth"]["status"] == "skipped"
        assert f"warning: skipped {tmp / 'in' / 'patient07' / 'truth.nii.gz'}, given as INPUT: looks like a label " \
               "mask" in err
    if row_id.startswith("scans of one name in folders of their own"):
        lines = (tmp / "out" / "summary.csv").read_text(encoding="utf-8-sig").splitlines()
        assert sorted(r["case"] for r in csv.DictReader(lines)) == ["patient07_flair", "patient19_flair"]
        assert (tmp / "out" / "patient19_flair_wmh.nii.gz").is_file()
    if row_id.startswith("a Slicer segmentation (`.seg.nrrd`)"):
        lines = (tmp / "out" / "summary.csv").read_text(encoding="utf-8-sig").splitlines()
        assert sorted(r["status"] for r in csv.DictReader(lines)) == ["ok", "skipped"]
        assert "case01: skipped - a Slicer segmentation (.seg.nrrd), not a FLAIR scan" in err
    if row_id == "sagittal acquisition":
        assert "sagittal acquisition with 5 mm slices" in err
        summary = (tmp / "out" / "summary.csv").read_text(encoding="utf-8-sig").splitlines()
        assert summary[0].endswith(",warnings") and "sagittal acquisition" in summary[1]
    if row_id.startswith("a scan exported in a display window"):
        report = json.loads((tmp / "out" / "windowed_report.json").read_text(encoding="utf-8"))
        assert "of the head's voxels hold the image's top value, 255" in err
        assert any("looks clipped" in warning for warning in report["warnings"])
    if row_id.startswith("a scan with a bright line through every slice"):
        summary = (tmp / "out" / "summary.csv").read_text(encoding="utf-8-sig")
        assert "straight bright line runs from front to back" in err and "straight bright line" in summary
    if row_id.startswith("a probability map of an earlier run"):
        assert f"give the FLAIR it was made from ({paths['good']})" in err
    if row_id.startswith("a T1-weighted scan given as the FLAIR"):
        assert "does not look like a FLAIR" in err and "T1-weighted" in err
        report = json.loads((tmp / "out" / "t1_report.json").read_text(encoding="utf-8"))
        assert report["contrast"]["looks_like"] == "T1-weighted"
    if row_id == "a T1-weighted scan given as a training case's FLAIR":
        assert "case c2 looks T1-weighted: the cortex is darker than the white matter" in err
        assert "--skip-bad-cases" in err and "--allow-non-flair" in err and not (tmp / "run" / "last.pt").exists()
    if row_id == "--dicom-outline with a NIfTI input":
        assert "the input is not DICOM" in err and not [p for p in (tmp / "out").iterdir() if p.is_dir()]
    if row_id == "--dicom-seg with a NIfTI input":
        assert "the input is not DICOM" in err and not list((tmp / "out").glob("*.dcm"))
        assert (tmp / "out" / "good_report.json").is_file()
    if row_id == "--dicom-seg with a DICOM series without a Frame of Reference UID":
        assert "rerun without --dicom-seg" in err and not list((tmp / "out").glob("flair*"))  # nothing written
    if row_id == "change --dicom-seg with a DICOM follow-up without a Frame of Reference UID":
        assert "rerun without --dicom-seg" in err and "registering" not in err  # before the registration
        assert not (tmp / "out").exists() or not list((tmp / "out").iterdir())  # nothing written
    if row_id == "--dicom-outline where the outline folder holds other files":
        assert (tmp / "out" / "flair_outline_dicom" / "notes.txt").read_text() == "mine"
        assert not (tmp / "out" / "flair_wmh.nrrd").exists()  # refused before anything was written
    if row_id.startswith("--dicom-outline --overwrite where the outline folder holds a FLAIR's images"):
        assert {f.name: f.read_bytes() for f in (tmp / "out" / "flair_outline_dicom").iterdir()} == \
            {f.name: f.read_bytes() for f in (tmp / "in" / "flair").iterdir()}
        assert not (tmp / "out" / "flair_wmh.nrrd").exists()  # refused before anything was written
    if row_id == "NIfTI whose header gives lengths in metres":
        report = json.loads((tmp / "out" / "metres_report.json").read_text(encoding="utf-8"))
        mask = sitk.ReadImage(str(tmp / "out" / "metres_wmh.nii.gz"))
        assert np.allclose(mask.GetSpacing(), sitk.ReadImage(str(tmp / "in" / "good.nii.gz")).GetSpacing(), atol=1e-4)
        voxel_ml = np.prod(mask.GetSpacing()) / 1000
        assert report["volume_ml"] == pytest.approx(sitk.GetArrayViewFromImage(mask).sum() * voxel_ml, abs=1e-4)
    if row_id in ("NIfTI-2 file", "gzip-compressed NIfTI named .nii", "a file name in upper case (`SCAN.MHA`, `SCAN.NII.GZ`)",
                  "NIfTI-1 pair (`.hdr` + `.img`, as SPM writes)", "compressed NIfTI-1 pair (`.hdr.gz` + `.img.gz`)",
                  "NIfTI whose sform holds NaN but is not in use (`sform_code` 0)"):
        # on the input's grid, in ml of it
        case, ext = {"NIfTI-2 file": ("two", ".nii.gz"), "gzip-compressed NIfTI named .nii": ("packed", ".nii.gz"),
                     "NIfTI-1 pair (`.hdr` + `.img`, as SPM writes)": ("pair", ".nii.gz"),
                     "NIfTI whose sform holds NaN but is not in use (`sform_code` 0)": ("unused_sform", ".nii.gz"),
                     "compressed NIfTI-1 pair (`.hdr.gz` + `.img.gz`)": ("zipped", ".nii.gz")}.get(row_id, ("SCAN", ".mha"))
        report = json.loads((tmp / "out" / f"{case}_report.json").read_text(encoding="utf-8"))
        mask = sitk.ReadImage(str(tmp / "out" / f"{case}_wmh{ext}"))
        good = sitk.ReadImage(str(tmp / "in" / "good.nii.gz"))
        for a, b in ((mask.GetSize(), good.GetSize()), (mask.GetSpacing(), good.GetSpacing()),
                     (mask.GetOrigin(), good.GetOrigin()), (mask.GetDirection(), good.GetDirection())):
            assert np.allclose(a, b, rtol=0, atol=1e-6)
        voxel_ml = np.prod(mask.GetSpacing()) / 1000
        assert report["volume_ml"] == pytest.approx(sitk.GetArrayViewFromImage(mask).sum() * voxel_ml, abs=1e-4)
    if row_id == "NIfTI whose sform holds NaN but is not in use (`sform_code` 0)":  # the input's placing fields kept
        written = gzip.decompress((tmp / "out" / "unused_sform_wmh.nii.gz").read_bytes())
        given = paths[row_id].read_bytes()
        assert written[252:256] == given[252:256] and written[256:280] == given[256:280]  # codes, quaternion, offset
        assert math.isnan(struct.unpack_from("<f", written, 292)[0])  # the unused sform as the input has it
    if row_id.startswith("axial slices thinner"):
        assert "acquisition" not in err
        report = json.loads((tmp / "out" / "thin_report.json").read_text(encoding="utf-8"))
        assert report["acquisition_plane"] == "axial"
        # no plane warning; the brain network's warnings on a 32 mm phantom (coverage, a slab of a cylinder) are no
        # concern of this row
        assert not [w for w in report["warnings"] if "acquisition" in w or "axial planes" in w], report["warnings"]
    if row_id == "an empty reference":
        assert "note: the reference is empty" in printed and "undefined" in printed
        result = json.loads((tmp / "e.json").read_text(encoding="utf-8"))
        assert result["sensitivity"] is None and result["hd95_mm"] is None and result["dice"] == 0.0
        assert any("reference is empty" in note for note in result["notes"])
    if row_id == "two rater masks each saved cropped to its own lesions":
        from DeepWMLLib.consensus import consensus_check

        result = json.loads((tmp / "c.json").read_text(encoding="utf-8"))
        whole = consensus_check(io.read_mask(paths["truth"]), io.read_mask(paths["other rater"]))
        assert 0 < result["dice"] < 1 and result["dice"] == whole["dice"]
        # the NIfTI's spacing is float32, the .seg.nrrd's written in full: volumes the same to a millionth
        assert [result["volume_a_ml"], result["volume_b_ml"]] == pytest.approx([whole["volume_a_ml"], whole["volume_b_ml"]],
                                                                                rel=1e-6)
        assert io.JOINT_EXTENT_NOTE in result["notes"] and "slice numbers" in printed
    if row_id == "a follow-up mask saved cropped to its lesions on the follow-up's voxels":
        report = json.loads((tmp / "out" / "good_change.json").read_text(encoding="utf-8"))
        assert report["followup_volume_ml"] > 0 and report["followup_volume_ml"] == pytest.approx(report["baseline_volume_ml"])
    if row_id in ("reference storing the same grid in another voxel order", "two-valued 0/255 reference") \
            or row_id.startswith(("reference saved cropped to its lesions", "a float mask whose lesion value is 1 but",
                                  "a DICOM SEG given as the reference (",
                                  "a DICOM SEG given as the reference stored RLE",
                                  "a DICOM SEG given as the reference of Segmentation Type LABELMAP")):
        assert json.loads((tmp / "e.json").read_text(encoding="utf-8"))["dice"] == 1.0


def test_readme_table_matches():
    """README's bad-input table lists exactly the rows tested here."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What happens with bad inputs", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| input", "| ---"))]
    documented = [line.split("|")[1].strip() for line in rows]
    assert documented == [f"{r[0]}" for r in BAD_INPUTS]
    for line, (row_id, command, code, words) in zip(rows, BAD_INPUTS):
        assert f"`deepwml {command}`" in line and f"exit {code}" in line and words in line, line


def render_readme_table() -> str:
    lines = ["| input | command | result |", "| --- | --- | --- |"]
    for row_id, command, code, words in BAD_INPUTS:
        outcome = words if words.startswith("ok") else f'one-line error containing "{words}"'
        lines.append(f"| {row_id} | `deepwml {command}` | exit {code}; {outcome} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_readme_table())
