"""Segment every FLAIR volume in a folder with the DeepWML module's logic, on MRML nodes.

    Slicer --no-main-window --python-script DeepWML/Scripts/segment_batch.py \\
        --input-dir IN --output-dir OUT [--device auto|cpu|cuda] [--precision auto|fp32|bf16]
        [--reference-dir REF] [--model FILE ...] [--grid-phases 1|4] [--dicom-seg] [--dicom-outline]

It also runs under plain Python with slicer-core installed (python DeepWML/Scripts/segment_batch.py ...).

Every image file (.nii, .nii.gz, .hdr + .img or .hdr.gz + .img.gz, .nrrd, .nhdr, .mha, .mhd) in IN is a case; its name without extension is
CASE. DICOM below IN, nested any depth as PACS exports are, gives one case per study named as `deepwml
segment` names it (its FLAIR picked among its series; a study without one is skipped). OUT receives, per case,
CASE.seg.nrrd (segment WMH, and with a ventricle model 'Lateral ventricles', the split's reference), CASE_wmh.nii.gz (.nrrd for NRRD
and DICOM inputs, .mha for MetaImage), CASE_report.json, with --qc CASE_qc.png, and for a DICOM input with
--dicom-seg CASE_wmh_seg.dcm (the mask as a DICOM SEG) and with --dicom-outline CASE_outline_dicom/ (the FLAIR with
the lesions outlined, a new series) (the same names and rules as `deepwml segment`'s; a rerun asking for one a case
done before lacks adds it from the saved mask, as deepwml segment does: status "added"), and summary.csv with one row per case (rewritten after each: a run stopped part way lists
the cases it did). With
--reference-dir, the reference of CASE is REF/CASE.<ext> or the only REF/CASE_*.<ext> (a .seg.nrrd or a
label image, any non-zero voxel is lesion); its Dice, sensitivity and precision go into the report
and the summary. Each case's steps are shown as it runs, and after it about how long the rest will take.
One failing case never stops the others. Exit status: 0 when every case succeeded,
had outputs added or was skipped, 1 when any failed, 2 for a usage error; stopped part way (Ctrl-C, SIGTERM or SIGHUP: a scheduler's
time limit, a closed ssh session), it says in which case, that summary.csv lists those before it (every case,
when stopped in one left to another run and done at the end) and that the same command goes on, and ends as `deepwml segment` does: 130 for Ctrl-C, 128 + the signal's number for a signal.
"""

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path

# The module folder (source checkout) or qt-scripted-modules (installed extension) holds DeepWMLSlicerLib.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slicer  # noqa: E402
from DeepWMLSlicerLib import MRMLConversion as mrml  # noqa: E402 (first: makes DeepWMLLib importable)
from DeepWMLSlicerLib.CoreLogic import PRECISION_CHOICES, DeepWMLCoreLogic  # noqa: E402
from DeepWMLLib import io, segment  # noqa: E402
from DeepWMLLib.cli import (end_progress_line, help_path, interruption, stop_signals_as_interrupts,  # noqa: E402
                            warning_printer)
from DeepWMLLib.errors import DeepWMLError, case_error  # noqa: E402

SUMMARY_COLUMNS = ["case", "input", "status", "error", "volume_ml", "lesion_count", "periventricular_ml", "deep_ml",
                   "dice", "sensitivity", "precision", "reference", "seconds", "warnings"]


def parseArguments(argv):
    parser = argparse.ArgumentParser(prog="segment_batch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-dir", required=True, type=Path, help="folder of FLAIR volumes (one case each)")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder for the results (created if needed)")
    parser.add_argument("--reference-dir", type=Path, help="folder of reference (manual) masks, matched by case name")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="as deepwml segment --precision: auto (bf16 on a CPU that computes bf16 natively where "
                             "it is measured faster than fp32 there, else fp32; fp16 on a GPU), fp32 (full precision "
                             "everywhere) or bf16")
    parser.add_argument("--model", nargs="+", metavar="FILE",
                        help="model file(s); several make an ensemble. The name of a shipped model or ensemble "
                             "(e.g. ensemble-v8) stands for its file(s), as in deepwml segment. Default: the shipped "
                             "default model")
    parser.add_argument("--threshold", type=segment.probability, help="probability threshold (default: the model's)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (left-right flip)")
    parser.add_argument("--grid-phases", type=int, default=1, choices=(1, 4),
                        help="as deepwml segment --grid-phases: 4 averages the lesion probabilities over the network "
                             "grid moved by 0 and half a pixel along rows and columns, for steadier marks (about 4 "
                             "times slower). Default 1")
    parser.add_argument("--no-brain-mask", action="store_true",
                        help="keep marks outside the brain (default: the shipped brain-mask model gates them); the "
                             "brain mask is still made for the checks (is it a FLAIR, is the whole brain in the scan)")
    parser.add_argument("--ventricle-model", metavar="FILE", help="lateral-ventricle model for the periventricular/deep "
                        "split (10 mm rule; default: none runs, unless the model registry marks a ventricle model "
                        "default; the shipped one is opt-in: "
                        f"{help_path(segment.models_dir() / segment.SHIPPED_VENTRICLE_MODEL)})")
    parser.add_argument("--no-location", action="store_true", help="no periventricular/deep split, even with a "
                        "default ventricle model")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip the case)")
    parser.add_argument("--qc", action="store_true", help="also write CASE_qc.png: the axial slices with the mask "
                        "outlined in red, or with --reference-dir filled green where it agrees with the reference, "
                        "red where only it marks lesion, blue where only the reference does")
    parser.add_argument("--dicom-seg", action="store_true", help="as deepwml segment --dicom-seg: for a DICOM input, "
                        "also write CASE_wmh_seg.dcm, the mask as a DICOM Segmentation object (SEG) of the same study, "
                        "which PACS viewers show as an overlay (another input: a warning in its report, no file)")
    parser.add_argument("--dicom-outline", action="store_true", help="as deepwml segment --dicom-outline: for a DICOM "
                        "input, also write CASE_outline_dicom/, the FLAIR with the lesions outlined in red as a new "
                        "series of the same study (another input: a warning in its report, no series)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failed cases")
    args = parser.parse_args(argv)
    if args.no_location and args.ventricle_model:
        parser.error("--no-location cannot go with --ventricle-model")
    return args


def findReference(referenceDir: Path, case: str, cases=()):
    """REF/CASE.<ext>, else the only REF/CASE_*.<ext>; None when there is none. A reference named after a
    longer case of IN that begins CASE_ (p2_fu beside p2; sub1_fu_manual beside sub1) is that case's.
    Upper and lower case are alike (P1_Manual.nii.gz is p1's, as on Windows and macOS), an exact match first."""
    candidates = sorted(p for p in referenceDir.iterdir() if p.is_file() and io.is_image_file(p))
    fold = case.casefold()
    exact = [p for p in candidates if io.case_name(p) == case] or \
        [p for p in candidates if io.case_name(p).casefold() == fold]
    if len(exact) > 1 and io.case_name(exact[0]) != case:
        raise DeepWMLError(f"several references match {case!r} ({', '.join(p.name for p in exact)}); "
                           f"name the right one {case}.nii.gz")
    if exact:
        return exact[0]
    longer = [c.casefold() for c in cases if c.casefold().startswith(fold + "_")]
    prefixed = [p for p in candidates if io.case_name(p).casefold().startswith(fold + "_")
                and not any(io.case_name(p).casefold() == c or io.case_name(p).casefold().startswith(c + "_")
                            for c in longer)]
    if len(prefixed) > 1:
        raise DeepWMLError(f"several references match {case!r} ({', '.join(p.name for p in prefixed)}); "
                           f"name the right one {case}.nii.gz")
    return prefixed[0] if prefixed else None


def caseWarnings(report: dict) -> list[str]:
    """A case's warnings and its comparison's notes (what the Dice leaves out, a reference of several labels
    joined, ...): summary.csv is where a cohort's Dice are read, so the notes that qualify them are there too."""
    notes = (report.get("comparison") or {}).get("notes") or []
    return list(dict.fromkeys(list(report.get("warnings") or []) + list(notes)))


def summaryFigures(report: dict) -> dict:
    """A case's figures in summary.csv, from its report (the one just made, or an earlier run's)."""
    split = report.get("location") or {}
    comparison = report.get("comparison") or {}
    row = {"volume_ml": report["volume_ml"], "lesion_count": report["lesion_count"],
           "periventricular_ml": split.get("periventricular_ml"), "deep_ml": split.get("deep_ml"),
           "warnings": " | ".join(caseWarnings(report))}
    if comparison:
        row.update({key: comparison.get(key) for key in ("dice", "sensitivity", "precision")},
                   reference=report.get("reference"))
    return row


def loadFlair(path: Path, case: str, study=None):
    """The FLAIR's volume node, the DICOM series it was read from (None for an image file), and what the report
    says of that series as `deepwml segment`'s does: its `dicom_series` entry and its warnings (which series
    was read where it was picked among others, files beside it that could not be read, a gap between its slices,
    slices unevenly spaced; segment.dicom_series_warnings); for an image file, only the warnings of what a converter
    wrote beside it (segment.image_file_warnings)."""
    if study is not None:  # a study of a PACS export below IN: its FLAIR (io.NoFlairSeries when it has none)
        series, how = io.choose_dicom_series(path, candidates=study.series, strict=True)
    elif path.is_dir():  # a DICOM series: slicer.util.loadVolume reads single files, SimpleITK reads series
        series, how = io.choose_dicom_series(path, option=None)
    else:  # an image file: what a converter wrote beside it (a JSON sidecar, b-values, a BIDS name) is warned of
        beside = {"warnings": segment.image_file_warnings(path)}  # as deepwml segment warns of it
        if io.read_time_axis(path):  # a NRRD or MetaImage file stored X, Y, Z, 1: Slicer's reader loses its
            return mrml.volumeFromImage(io.read_image(path), case), None, beside  # orientation, SimpleITK keeps it
        if io.is_nifti_pair(path):  # .hdr + .img: DeepWMLLib refuses an Analyze 7.5 pair, which Slicer would load
            return mrml.volumeFromImage(io.read_image(path), case), None, beside  # with a guessed left and right
        if io.is_nifti(path):  # Slicer's reader fills a NIfTI cut short with zeros, unsaid: 'ok - 0.00 ml'
            io.read_any(path, light=True)  # refused as deepwml segment refuses it (truncated, NaN...)
        return inFileVoxelOrder(mrml.loadVolumeFile(str(path), case), path), None, beside
    image = io.read_image(path, series=series)
    warnings = segment.dicom_series_warnings(series, how, image, another=BATCH_OTHER_SERIES)
    return mrml.volumeFromImage(image, case), series, {"dicom_series": series.as_dict(how), "warnings": warnings}


# the batch script has no --series: a series picked among others is named, and how to read another told
BATCH_OTHER_SERIES = "the others were left (deepwml segment --series reads another)"


def inFileVoxelOrder(volumeNode, path: Path):
    """The volume with its voxels in the file's order. Slicer's reader stores the slices of a file whose voxel
    grid is left-handed (an oblique scan stored with a flipped axis, NIfTI in FSL's radiological order) in
    reverse order: the same place in the world, but the mask was written with its slices reversed against the
    input (not on the input's grid, as `deepwml segment` writes it) and the report numbered slices and lesions
    from the other end. Such a node is replaced by one on the file's grid (nothing interpolated)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:  # read by Slicer, not by SimpleITK: left as Slicer stored it
        return volumeNode
    if reader.GetDimension() != 3:
        return volumeNode
    image = mrml.imageFromVolume(volumeNode)
    grid = sitk.Image(reader.GetSize(), sitk.sitkUInt8)
    grid.SetSpacing(reader.GetSpacing())
    grid.SetOrigin(reader.GetOrigin())
    grid.SetDirection(reader.GetDirection())
    reordered = io.align_voxel_order(image, grid)
    if reordered is image:  # already in the file's order, or not the file's voxels reordered: as Slicer read it
        return volumeNode
    name = volumeNode.GetName()
    mrml.removeNode(volumeNode)
    return mrml.volumeFromImage(reordered, name)


def loadReference(path: Path):
    if path.name.lower().endswith(io.SEGMENTATION_EXTENSION):
        return mrml.loadSegmentationFile(str(path))
    return mrml.loadVolumeFile(str(path), io.case_name(path) + " reference", labelmap=True)


def segmentCase(logic, case: str, path: Path, args, study=None, progress=None) -> dict:
    """One case, as `deepwml segment` does it: a scan given is never written over, and a case another DeepWML
    process is writing now is left to it (a lock on it: io.BeingWritten). `progress(fraction, message)` is told
    the segmentation's steps."""
    from DeepWMLLib.segment import output_paths

    dicom = path.is_dir()  # a DICOM input (a series' or a study's folder): only it has a patient and a study to write
    # a SEG or an outline series into, as deepwml segment decides it
    paths = output_paths(args.output_dir, case, False, extension=io.output_extension(path), qc=args.qc,
                         dicom_outline=args.dicom_outline and dicom, dicom_seg=args.dicom_seg and dicom)
    with segment.case_guard(args.output_dir, case, paths, args.protected):
        return _segmentCase(logic, case, path, args, study, paths, progress)


def _segmentCase(logic, case: str, path: Path, args, study, paths, progress=None) -> dict:
    from DeepWMLLib.evaluation import json_text
    from DeepWMLLib.segment import check_earlier_result, input_fingerprint

    # a run killed part way (its journal lists its files): refused without --overwrite, never skipped as done
    segment.refuse_stopped(paths["report"], args.overwrite)
    # an earlier outline series' folder holding a user's images (IM*.dcm not DeepWML's): refused, never emptied
    segment.refuse_foreign_outlines(args.output_dir, case, paths, args.overwrite, args.protected)
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not args.overwrite:
        # no report: an earlier run stopped part way (a folder of the outline series' name holding a user's images
        # said as such first), as deepwml segment refuses it
        segment.refuse_incomplete(paths, existing)
        earlier = check_earlier_result(args.output_dir, case, path, paths["report"], [paths["mask"].name],
                                       args.settings, study)
        # a folder of the outline series' name that the report does not list (a user's) is no outline of the case
        missing = segment.outputs_to_add(paths)
        if missing:  # asked for now (--qc, --dicom-outline, --dicom-seg), not made then or deleted since: made from
            return addOutputs(logic, case, path, args, study, paths, missing, earlier, progress)  # the saved mask
        row = {"status": "skipped", "error": segment.skip_message(existing, earlier)}
        try:  # the earlier result's figures stay in summary.csv, which this run writes anew
            row.update(summaryFigures(earlier))
        except (KeyError, TypeError, AttributeError):
            pass
        return row
    outline, seg = "dicom_outline" in paths, "dicom_seg" in paths
    if outline:  # refused before any work, as deepwml segment refuses it
        from DeepWMLLib.dicom_outline import check_outline_folder

        check_outline_folder(paths["dicom_outline"], args.overwrite)
    reference = findReference(args.reference_dir, case, args.cases) if args.reference_dir else None
    nodes, referenceNode = [], None
    try:
        volumeNode, series, dicom = loadFlair(path, case, study)
        nodes.append(volumeNode)
        if series is not None:  # a series the SEG or outline cannot be made of: refused before the networks run, as
            segment.check_dicom_source(series, outline, seg)  # deepwml segment refuses it
        segmentationNode = logic.segmentVolume(volumeNode, device=args.device, progress=progress, **args.run)
        nodes.append(segmentationNode)
        report = {"case": case, "input": str(path), **logic.lesionStatistics(segmentationNode, volumeNode)}
        if dicom.get("dicom_series"):  # as `deepwml segment` reports a DICOM series: which one
            report["dicom_series"] = dicom["dicom_series"]
        if dicom.get("warnings"):  # and what its header or an image file's sidecar says, first among the warnings
            # (once: the module's logic warns of a file's sidecar too, where Slicer's reader loaded the file)
            report["warnings"] = list(dict.fromkeys([*dicom["warnings"], *(report.get("warnings") or [])]))
        notDicom = [warning for asked, made, warning in ((args.dicom_outline, outline, segment.NO_DICOM_OUTLINE),
                                                         (args.dicom_seg, seg, segment.NO_DICOM_SEG))
                    if asked and not made]
        if notDicom:  # asked for an input that is not DICOM: said in its report and summary, as deepwml segment does
            report["warnings"] = [*(report.get("warnings") or []), *notDicom]
        row = {**summaryFigures(report), "_warnings": list(report.get("warnings") or [])}
        if reference is not None:
            referenceNode = loadReference(reference)
            nodes.append(referenceNode)
            comparison = logic.compareSegmentations(segmentationNode, referenceNode, volumeNode)
            report.update(reference=str(reference), comparison=comparison)
            warnings = caseWarnings(report)  # the case's and its comparison's, now the comparison is in
            row.update({key: comparison[key] for key in ("dice", "sensitivity", "precision")}, reference=str(reference),
                       warnings=" | ".join(warnings), _warnings=warnings)
        mask = mrml.maskFromSegmentation(segmentationNode, volumeNode)
        # a DICOM input's image numbers, which PACS shows, beside the voxel indices (the slices' dicom_instance, the
        # lesions' dicom_instance_range), and on the QC picture's tiles: as deepwml segment adds them, by its code
        instances = segment.dicom_instances(series, mask) if series is not None else None
        segment.add_instance_numbers(report, instances)
        timeAxis = io.read_time_axis(path)  # an input stored X, Y, Z, 1: its mask is written so too
        report.update(input_absolute=str(path.resolve()), input_fingerprint=input_fingerprint(path, series),
                      outputs=sorted(p.name for p in paths.values()), input_size=io.stored_size(mask, timeAxis),
                      mask_sha256=segment.mask_digest(mask))  # as deepwml segment records it: the mask written
        if args.qc:  # drawn before anything is written: a picture that fails leaves no half set of outputs
            import SimpleITK as sitk
            from DeepWMLLib.qc import png_bytes, render, render_comparison

            from DeepWMLLib.segment import picture_title

            image, title = mrml.imageFromVolume(volumeNode), picture_title(case, report)
            ventricles = (mrml.maskFromSegmentation(segmentationNode, volumeNode, mrml.VENTRICLE_SEGMENT_NAME)
                          if report.get("location") else None)  # outlined as `deepwml segment --qc` does
            if referenceNode is None:
                picture = png_bytes(render(image, mask, title, ventricles=ventricles, slice_labels=instances))
            else:
                reference = sitk.Cast(mrml.maskFromNode(referenceNode, volumeNode) != 0, sitk.sitkUInt8)
                picture = png_bytes(render_comparison(image, mask, reference, title, names=("DeepWML", "reference")))
        if outline or seg:  # made before anything is written too, by deepwml segment's own functions, on the grid
            # of the series as read (the volume's: loadFlair made it from that image)
            flair = mrml.imageFromVolume(volumeNode)
            if outline:
                from DeepWMLLib.dicom_outline import outline_series

                prepared = outline_series(flair, mask, series, report)
            if seg:
                from DeepWMLLib.dicom_seg import segmentation

                segmented = segmentation(flair, mask, series, report)
            flair = None
        with segment.whole_or_none(paths):  # stopped part way: the case's outputs go, its earlier report first
            # first the journal listing what this run writes and removes (killed outright, its files are listed:
            # refused, then removed by --overwrite); with --overwrite the earlier report (never an old report
            # beside new files), then the earlier run's outputs this one will not write (a picture, a SEG, an
            # outline series, a probability map, a mask in another format), before anything new: deepwml
            # segment's rule, by its code (only what the earlier report, or a stopped run's journal, lists)
            segment.start_outputs(args.output_dir, case, paths, args.overwrite, args.protected)
            io.write_atomically(paths["segmentation"], lambda tmp: mrml.writeSegmentationFile(segmentationNode, tmp))
            io.write_image(mask, paths["mask"], timeAxis,
                           io.read_nifti_geometry(path))  # a NIfTI input's qform and sform as they stand
            segment.write_qc_and_dicom(report, paths, args.overwrite, picture if args.qc else None,
                                       prepared if outline else None, segmented if seg else None)
            segment.finish_report(paths["report"], json_text(report))  # the journal's end
    finally:
        for node in nodes:
            mrml.removeNode(node)
    return {"status": "ok", "error": "", **row}


def addOutputs(logic, case: str, path: Path, args, study, paths: dict, missing: list, earlier: dict, progress) -> dict:
    """A case done before that lacks outputs asked for now (`missing`): made as `deepwml segment` makes them, by its
    own segment.add_outputs, from the saved mask (checked: on the scan's grid, unedited since its report), the report
    rewritten listing them; status "added". The networks are run again only for the ventricles its QC picture
    outlines (a run with a ventricle model: the batch saves no ventricle mask), by the module's logic with this run's
    settings, and their mask must be the saved one. For a case its report compared with a reference, the picture
    compares the mask with that reference (the report's and summary's Dice are with it), as this script drew it for
    the case it segmented; another that --reference-dir finds now is not used, and the row says so."""
    from types import SimpleNamespace

    from DeepWMLLib.inference import progress_part
    from DeepWMLLib.volume import Volume

    def asImage(image):
        return image.to_sitk() if isinstance(image, Volume) else image

    def networks(image):
        volumeNode = mrml.volumeFromImage(asImage(image), case)
        segmentationNode = None
        try:
            segmentationNode = logic.segmentVolume(volumeNode, device=args.device, **args.run, progress=progress_part(
                progress, segment.READING_SHARE, segment.SEGMENTING_SHARE))
            mask = mrml.maskFromSegmentation(segmentationNode, volumeNode)
            ventricles = (mrml.maskFromSegmentation(segmentationNode, volumeNode, mrml.VENTRICLE_SEGMENT_NAME)
                          if earlier.get("location") else None)
            return SimpleNamespace(mask=mask, ventricles=ventricles, brain=None, probabilities=None)
        finally:
            for node in (segmentationNode, volumeNode):
                if node is not None:
                    mrml.removeNode(node)

    # the picture against the reference the report's comparison (and summary.csv's Dice) was computed with, as the
    # run that made the report drew it: not another that --reference-dir finds now (the folder changed), nor one
    # found for a case compared with none then
    reference = earlier.get("reference") if earlier.get("comparison") and "qc" in missing else None
    reference = Path(reference) if reference and Path(reference).is_file() else None
    found = findReference(args.reference_dir, case, args.cases) if args.reference_dir and "qc" in missing else None
    note = ""
    if found is not None and (reference is None or found.resolve() != reference.resolve()):
        note = (f"; its picture drawn {f'against {reference}, the reference' if reference else 'without the reference'}"
                f" of its report, not {found} found now: rerun with --overwrite to compare with that")

    def drawComparison(image, mask, title):
        import SimpleITK as sitk
        from DeepWMLLib.qc import png_bytes, render_comparison

        flair = asImage(image)
        volumeNode, referenceNode = mrml.volumeFromImage(flair, case), None
        try:
            referenceNode = loadReference(reference)
            marked = sitk.Cast(mrml.maskFromNode(referenceNode, volumeNode) != 0, sitk.sitkUInt8)
        finally:
            for node in (referenceNode, volumeNode):
                if node is not None:
                    mrml.removeNode(node)
        return png_bytes(render_comparison(flair, asImage(mask), marked, title, names=("DeepWML", "reference")))

    added = segment.add_outputs(case, path, args.output_dir, paths, missing, earlier, study, networks, progress,
                                draw=drawComparison if reference is not None else None)
    return {"status": segment.ADDED, "error": added["error"] + note, **summaryFigures(earlier)}


def segmentAll(logic, inputs, named, args, bar, rows: list, summaryPath: Path) -> None:
    """Each case of `inputs` in turn, its row added to `rows` and summary.csv rewritten after it."""
    from DeepWMLLib.evaluation import csv_cells

    summary = io.GrowingCsv(SUMMARY_COLUMNS, summaryPath)  # each row formatted once, as deepwml segment's
    for number, (case, path, study) in enumerate(inputs, 1):
        update = bar(number, len(inputs), case)
        start = time.perf_counter()
        try:
            if isinstance(study, DeepWMLError):  # a folder below IN that could not be read
                raise study
            if segment.found_segmentation(path, named):  # a case's Slicer segmentation beside its scan
                row = {"status": "skipped", "error": segment.SEGMENTATION_SKIPPED, "_mask": True}
            else:
                row = segmentCase(logic, case, path, args, study, update)
        except io.BeingWritten:  # another DeepWML run into OUT is writing this case: left to it, not a failure
            row = segment.left_to_another(args.output_dir, case, path, study)
        except Exception as exc:  # one bad case never stops the others
            row = caseFailure(exc, args)
        row.update(case=case, input=str(path), seconds=round(time.perf_counter() - start, 3))
        rows.append(row)
        showFinished(bar, row)
        with summaryWritten(summaryPath):
            summary.add(csv_cells(summaryRow(row), SUMMARY_COLUMNS))


def writeSummary(rows: list, summaryPath: Path) -> None:
    """summary.csv, its seconds as deepwml segment's (segment.summary_seconds: none for a case skipped)."""
    from DeepWMLLib.evaluation import write_csv

    with summaryWritten(summaryPath):
        write_csv([summaryRow(row) for row in rows], SUMMARY_COLUMNS, summaryPath)


def summaryRow(row: dict) -> dict:
    return {**row, "seconds": segment.summary_seconds(row)}


@contextlib.contextmanager
def summaryWritten(summaryPath: Path):
    """A summary.csv that cannot be written (a full disk) is removed, as deepwml segment does: an earlier run's never
    stands for this one's."""
    try:
        yield
    except DeepWMLError as exc:
        raise DeepWMLError(f"{exc}; {segment.without_summary(summaryPath)}") from exc


def showFinished(bar, row: dict) -> None:
    """A case's line when it is done, with its warnings (a skipped case's are its earlier run's)."""
    bar.finish({**row, "warnings": row.get("_warnings", [])})


def caseFailure(exc: Exception, args) -> dict:
    """The status and error of a case that raised `exc`: a study without a FLAIR, or a case's manual mask beside its
    FLAIR in IN, is skipped, not failed; any other exception is the case's error."""
    if isinstance(exc, io.NoFlairSeries):  # a study of an export that is not a FLAIR exam
        return segment.no_flair_row(exc)
    if isinstance(exc, io.LabelMaskGiven):
        return {"status": "skipped", "error": segment.mask_skipped(exc), "_mask": True}
    if args.debug:
        end_progress_line()  # the traceback on lines of its own, below the case's bar where it stopped
        traceback.print_exc()
    message = case_error(exc)
    if exc.__cause__ is not None:
        from DeepWMLLib.inference import NaNProbabilities, PrecisionUnavailable

        if isinstance(exc.__cause__, (NaNProbabilities, PrecisionUnavailable)):  # the module's words name
            message = str(exc.__cause__)  # its panel's Precision; deepwml segment's --precision is the batch's
    return {"status": "error", "error": message}


def main(argv) -> int:
    args = parseArguments(argv)
    import warnings  # here: the cases' own `warnings` are lists

    shown = warnings.showwarning  # a warning (a runtime's fallback): one line, never on the end of the bar's line
    warnings.showwarning = warning_printer("segment_batch", args.debug)
    try:
        with stop_signals_as_interrupts():
            return runBatch(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: ended as `deepwml segment` ends
        words, status = interruption(exc)
        print(f"segment_batch: {words}", file=sys.stderr, flush=True)
        return status
    finally:
        warnings.showwarning = shown


def runBatch(args) -> int:
    mrml.initializeStandaloneScene()
    from DeepWMLLib.segment import expand_inputs

    logic = DeepWMLCoreLogic()
    try:
        if not args.input_dir.is_dir():
            raise DeepWMLError(f"input folder {args.input_dir} does not exist")
        if args.reference_dir is not None and not args.reference_dir.is_dir():
            raise DeepWMLError(f"reference folder {args.reference_dir} does not exist")
        logic.ensureDependencies()
        args.model = segment.model_files(args.model)
        # the logic's options of every case's run, and from the same, what a case done before must have been made
        # with to be skipped
        args.run = dict(modelPaths=args.model, threshold=args.threshold, tta=args.tta, precision=args.precision,
                        gridPhases=args.grid_phases, brainMask=not args.no_brain_mask,
                        location=False if args.no_location else (args.ventricle_model or True))
        args.settings = logic.plannedSettings(**args.run)
        from DeepWMLLib.inference import check_runtime

        # --device cuda without a GPU, --precision bf16 on a CPU without native bf16 (each case refused it): refused,
        # as a model of the wrong kind, before OUT (the module runs the networks with the auto backend)
        check_runtime(args.device, "auto", args.precision)
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except (DeepWMLError, OSError) as exc:
        print(f"segment_batch: error: {exc}", file=sys.stderr)
        return 1
    rows = []
    inputs = list(expand_inputs([str(args.input_dir)]))
    named = frozenset({args.input_dir.resolve()})
    try:  # names that clash told apart by their folders, or refused (a segmentation beside its scan clashes not)
        inputs = segment.case_names_apart(inputs, named)
    except DeepWMLError as exc:
        print(f"segment_batch: error: {exc}", file=sys.stderr)
        return 1
    args.cases = [case for case, _, _ in inputs]  # to tell CASE_* references from those of longer case names
    args.protected = frozenset(path.resolve() for _, path, _ in inputs)  # never written over
    # each case's steps as they run and, after each, about how long the rest will take: as deepwml segment's
    # (plain lines at each quarter when the output is a log, not a terminal)
    bar = segment.ProgressBar(sys.stdout, eta=True)
    # summary.csv rewritten (atomically) after every case, as deepwml change's: a run stopped part way (Ctrl-C,
    # Slicer closed or killed) leaves the cases it did listed, and never an earlier run's summary as this one's
    summaryPath = args.output_dir / "summary.csv"
    writeSummary(rows, summaryPath)
    noOverwrite = argparse.Namespace(**{**vars(args), "overwrite": False})
    try:
        segmentAll(logic, inputs, named, args, bar, rows, summaryPath)
        # the cases left to another run, looked at again as `deepwml segment` does: finished by it, its figures;
        # failed there (its lock free, no result), segmented now
        segment.recheck_left_to_another(
            rows, args.output_dir,
            lambda number, row, path, study, own: segmentCase(logic, row["case"], path, args if own else noOverwrite,
                                                              study, bar(number, len(inputs), row["case"])),
            lambda row, exc: caseFailure(exc, args), lambda row: showFinished(bar, {**row, "_to_segment": 0}))
    except KeyboardInterrupt:  # the cases done kept in summary.csv, and said how to go on, as `deepwml segment` does
        writeSummary(rows, summaryPath)
        segment.say_stopped(bar, summaryPath, args.overwrite)
        raise
    # a folder of masks given for IN, or a PACS export of the wrong exam (no FLAIR in any study): errors, not 'done'
    for error in (segment.no_flair_anywhere(rows, choose=None), segment.masks_only(rows)):
        if error:
            print(f"segment_batch: error: {error}", file=sys.stderr, flush=True)
    writeSummary(rows, summaryPath)
    print(segment.batch_total(rows, "cases", summaryPath), flush=True)
    return 1 if any(row["status"] == "error" for row in rows) else 0


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        status = exc.code
    except Exception as exc:  # e.g. summary.csv cannot be written: say so, and still leave Slicer below
        print(f"segment_batch: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        status = 1
    if hasattr(slicer, "app"):
        slicer.util.exit(status)  # leaves Slicer's event loop with this status
    else:
        sys.exit(status)
