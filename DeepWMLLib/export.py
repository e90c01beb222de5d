"""`deepwml export FLAIR MASK -o OUTDIR`: a mask DeepWML did not just compute (its own mask corrected by hand in
Slicer or ITK-SNAP, or a rater's) made into the outputs PACS takes: the report (CASE_report.json) with the mask's own
figures, and on request the DICOM SEG (--dicom-seg), the outline series (--dicom-outline) and the QC picture (--qc).

The FLAIR is read as `deepwml segment` reads it (an image file, a DICOM series folder, or a study's folder whose
FLAIR is picked, --series naming another); the mask as every command reads one (`io.read_mask`: NIfTI, NRRD, a
Slicer .seg.nrrd, a DICOM SEG...), put on the FLAIR's grid as `evaluate` and `change` put it (`io.onto_grid`:
reordered, or padded when saved cropped on its voxels; a mask on another grid refused), any non-zero voxel a lesion
but label 2 (ignore) of a mask holding 1 and 2.
No WMH network runs: the report's figures are those `deepwml segment` writes for a mask (`report.lesion_report`:
volume, lesion count, lesion table, LV groups per slice). The periventricular/deep split is made as segment makes it
(`segment.mask_location`: the ventricle and brain networks on the FLAIR, the same `location` entry and the lesions'
distances to the ventricles) where a ventricle model runs: --ventricle-model FILE, or the registry's default one
(the shipped registry marks none), --no-location none; without one `location` is null and `location_why` says why.
The brain mask keeps the ventricles inside the brain as segment's does (--brain-model FILE: another brain-mask
model; --no-brain-mask: not applied to the ventricles, as with segment --no-brain-mask, still made for
`intracranial_ml`); with no split they would change nothing and are refused. The QC picture outlines the ventricles
the split measured from, as segment's does.
The report says what it is an export of (`source` "export", `mask`, `mask_sha256`, `algorithm_type`, `creator`) and
names no WMH model (`model` null). The SEG's segment is SEMIAUTOMATIC by default (a DeepWML mask edited by hand),
MANUAL (a rater's) or AUTOMATIC with --algorithm-type (`dicom_seg.segmentation`); --creator names the person who
edited or drew it (a DICOM Person Name, Family^Given): the SEG's Content Creator's Name, and in the outline series'
Derivation Description (a Secondary Capture has no Content Creator's Name).

Outputs there are refused unless --overwrite, and an OUTDIR holding `deepwml segment`'s outputs of the same case is
refused even then (its report and mask would no longer agree): export into another OUTDIR, or name the case with
--case.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import numpy as np

from . import io
from .errors import DeepWMLError, UsageError

SOURCE = "export"  # the report's `source`
IGNORE_LABEL = 2  # metrics.IGNORE_LABEL: the mask conventions' "ignore"
LOCATION_OFF = "no periventricular/deep split: --no-location"
# the report's `brain_mask`: what the brain mask was used for (export's mask is given: it gates no mark, only the
# ventricles the split measures from, as segment's brain mask gates them)
BRAIN_MASK_GATES_VENTRICLES = "keeps the ventricles inside the brain"
BRAIN_MASK_NOT_APPLIED = "not applied to the ventricles"


def location_left_out() -> str:
    """The report's `location_why` where no ventricle model ran."""
    from .segment import SHIPPED_VENTRICLE_MODEL, models_dir

    return ("no periventricular/deep split: it needs the ventricle network, and none runs by default; give one with "
            f"--ventricle-model (the shipped, opt-in one: {models_dir() / SHIPPED_VENTRICLE_MODEL})")
EXPORT_OUTPUTS = ("report", "qc", "dicom_outline", "dicom_seg")  # of segment.output_paths' keys, those export writes


def export_paths(out_dir: Path, case: str, qc: bool, dicom_outline: bool, dicom_seg: bool) -> dict:
    """The outputs of an export, named as `deepwml segment` names them (`segment.output_paths`)."""
    from .segment import output_paths

    paths = output_paths(out_dir, case, False, qc=qc, dicom_outline=dicom_outline, dicom_seg=dicom_seg)
    return {key: path for key, path in paths.items() if key in EXPORT_OUTPUTS}


def _segment_run_there(report: Path) -> bool:
    """Whether `report` is one `deepwml segment` wrote (not an export's): its mask beside it would not be the one
    an export's report describes."""
    try:
        earlier = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(earlier, dict) and earlier.get("source") != SOURCE


@contextlib.contextmanager
def _io_warnings():
    """The warnings io logs while the block runs (reading a mask: which segments were joined or left out), as a
    list filled when it ends, kept from the console then: export_case records them in the report and says them
    once, with its other warnings."""
    import logging

    heard: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            heard.append(record.getMessage())

    logger, handler = logging.getLogger(io.__name__), Keep(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield heard
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def read_flair_and_mask(flair: Path, mask: Path, series: str | None = None):
    """(the FLAIR image, (DicomSeries, how it was chosen) or None, the 0/1 mask on its grid, (the mask's non-zero
    labels, the voxels of label 2 left out)): the FLAIR read as `deepwml segment` reads it, the mask as `io.read_mask`
    reads one, onto the FLAIR's grid. Any non-zero voxel is lesion, but in a mask holding both 1 and 2 (the mask
    conventions' lesion and ignore, as `deepwml evaluate` reads a reference) label 2 is left out."""
    from .volume import Volume, like, voxels

    if not flair.exists():
        raise DeepWMLError(f"{flair} does not exist")
    if not mask.exists():
        raise DeepWMLError(f"{mask} does not exist")
    if flair.is_dir() and not (io.is_dicom_folder(flair) or io.has_dicom_below(flair)):
        raise DeepWMLError(io.undecodable_dicom(flair) or f"{flair} is a folder without a DICOM series; give the "
                           "FLAIR's DICOM folder or image file")
    chosen = io.choose_dicom_series(flair, series) if flair.is_dir() else None
    if series is not None and chosen is None:
        raise UsageError("--series names a series of a DICOM folder; the FLAIR given is an image file")
    image = io.read_image(flair, light=True, series=chosen[0] if chosen else None)
    with _io_warnings() as heard:  # what reading the mask says (segments joined or left out): into the report
        marked = io.read_mask(mask, image, "the FLAIR", source=chosen[0] if chosen else None)
    array = np.asarray(voxels(marked))
    values = [int(v) for v in np.unique(array) if v]
    ignored = 0
    if 1 in values and IGNORE_LABEL in values:  # the mask conventions' 1 lesion, 2 ignore (a MICCAI rater's other
        # pathology, as `evaluate` reads a reference): not lesion
        ignored = int(np.count_nonzero(array == IGNORE_LABEL))
        lesion = (array != 0) & (array != IGNORE_LABEL)
    else:
        lesion = array != 0
    binary = like(lesion.astype(np.uint8), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                  Volume if isinstance(image, Volume) else None)
    return image, chosen, binary, (values, ignored, heard)


def export_case(flair, mask, out_dir, case: str | None = None, dicom_seg: bool = False, dicom_outline: bool = False,
                qc: bool = False, overwrite: bool = False, series: str | None = None,
                algorithm_type: str = "SEMIAUTOMATIC", creator: str | None = None, ventricle_model="default",
                device: str = "auto", brain_model="default", brain_gate: bool = True) -> dict:
    """Export `mask` (a file) drawn on `flair` (module docstring) into `out_dir`; returns the report written.
    Warnings (a non-DICOM FLAIR with `dicom_seg` or `dicom_outline`, what the FLAIR's header says) are recorded in
    the report and said (warnings.warn). `creator`: who edited or drew the mask (a DICOM Person Name,
    Family^Given). `ventricle_model`: as `segment.segment_image` takes it ("default": the registry's default, None:
    no split); `device`: where its networks run. `brain_model` (as segment_image takes it) and `brain_gate` (False:
    the ventricles not kept inside the brain mask, segment's --no-brain-mask) shape the split alone: a brain model
    of one's own given (a model file or a loaded model, not "default"/True nor None/False: segment.names_own_model),
    or `brain_gate` False, with no split made is refused (UsageError)."""
    from . import __version__
    from .dicom_seg import ALGORITHM_TYPES, person_name
    from .report import lesion_report
    from .segment import (NO_DICOM_OUTLINE, NO_DICOM_SEG, asks_for_no_model, case_guard, dicom_instances,
                          dicom_series_warnings, load_brain_model, load_ventricle_model, mask_digest, mask_location,
                          names_own_model, picture_title, scan_header_warnings, stopped_outputs, whole_or_none)
    from .segment import (add_instance_numbers, check_dicom_source, finish_report, journal_path,
                          refuse_foreign_outlines, refuse_stopped, start_outputs, write_qc_and_dicom)

    start = time.perf_counter()
    if algorithm_type not in ALGORITHM_TYPES:
        raise UsageError(f"--algorithm-type must be one of {', '.join(ALGORITHM_TYPES)}, got {algorithm_type!r}")
    if creator is not None:
        try:
            creator = person_name(creator)
        except ValueError as exc:
            raise UsageError(f"--creator {exc}") from None
    asked_location = not asks_for_no_model(ventricle_model)
    ventricle_model = load_ventricle_model(ventricle_model)  # a model of another kind refused before any work
    # asked for: a brain model of one's own (--brain-model FILE; a path or a loaded model given to the library). The
    # default ("default" or True: the CLI's without --brain-model) and none (None or False) change nothing without
    # a split, so they are never refused
    brain_asked = names_own_model(brain_model)
    if ventricle_model is None and (brain_asked or not brain_gate):
        given = " and ".join(o for o, on in (("--brain-model", brain_asked), ("--no-brain-mask", not brain_gate)) if on)
        raise UsageError(f"{given} shape{'s' if ' and ' not in given else ''} only the periventricular/deep split, "
                         "which needs a ventricle model"
                         + (": --no-location makes none" if not asked_location else
                            ", and none runs (the model registry marks none default): give --ventricle-model FILE"))
    brain_model = load_brain_model(brain_model) if ventricle_model is not None else None  # refused before any work
    if ventricle_model is not None:  # its networks' --device (cuda without a GPU) refused before OUTDIR or a scan read
        from .inference import check_runtime

        check_runtime(device)
    flair, mask = Path(flair), Path(mask)
    if case is not None and (not case.strip() or case in (".", "..") or any(c in case for c in "/\\\0")):
        raise UsageError(f"--case {case!r} is no file name (its outputs are CASE_report.json, ...): give a name "
                         "without / or \\")
    case = case or io.case_name(flair)
    image, chosen, binary, labels = read_flair_and_mask(flair, mask, series)
    outline, seg = dicom_outline and chosen is not None, dicom_seg and chosen is not None
    out = io.make_output_dir(out_dir)
    paths = export_paths(out, case, qc, outline, seg)
    protected = {flair.resolve(), mask.resolve()}
    with case_guard(out, case, paths, protected):
        # a deepwml segment run of the case killed part way (its journal lists a mask, a .seg.nrrd: no export's
        # names): --overwrite, which refuse_stopped advises, would leave them listed nowhere, as beside its report
        theirs = sorted(set(stopped_outputs(paths["report"]) or ()) - {p.name for p in export_paths(out, case, True, True,
                                                                                                   True).values()})
        if theirs:
            raise DeepWMLError(f"{out} holds the outputs of a deepwml segment run of case {case!r} that was stopped "
                               f"part way ({', '.join(theirs[:4])}{', ...' if len(theirs) > 4 else ''}), which its "
                               f"journal {journal_path(paths['report']).name} lists; export into another OUTDIR, or give "
                               "another name with --case (deepwml segment --overwrite redoes that case)")
        refuse_stopped(paths["report"], overwrite)  # a run killed part way (its journal lists its files)
        refuse_foreign_outlines(out, case, paths, overwrite, protected, list(export_paths(out, case, True, True,
                                                                                         True).values()))
        # refused first: --overwrite, which the refusal below advises, would not do
        if paths["report"].exists() and _segment_run_there(paths["report"]):
            raise DeepWMLError(f"{out} holds the outputs deepwml segment wrote for case {case!r} "
                               f"({paths['report'].name}), which an export's report would replace; export into "
                               "another OUTDIR, or give another name with --case")
        existing = sorted(p.name for p in paths.values() if p.exists())
        if existing and not overwrite:
            if outline:  # a folder of the outline series' name that --overwrite would not replace either (a user's
                from .dicom_outline import refuse_unreplaceable  # images): said first, and what to do

                refuse_unreplaceable(paths["dicom_outline"])
            raise DeepWMLError(f"{', '.join(existing)} already in {out}; rerun with --overwrite to replace "
                               f"{'it' if len(existing) == 1 else 'them'}, or export into another OUTDIR")
        if outline:  # refused before any work (the split's networks, the picture), as segment refuses it
            from .dicom_outline import check_outline_folder

            check_outline_folder(paths["dicom_outline"], overwrite)
        if chosen:  # a series the outline or SEG cannot be made of (headers alone): before the split's networks run
            check_dicom_source(chosen[0], outline, seg)
        # the split made before anything is written (networks: seconds), as segment makes it for its own mask
        split = mask_location(image, binary, ventricle_model, brain_model, device=device,
                              brain_gate=brain_gate) if ventricle_model is not None else None
        report = {"case": case, "input": str(flair), "input_absolute": str(flair.resolve()), "source": SOURCE,
                  "mask": str(mask), "mask_absolute": str(mask.resolve()), "mask_sha256": mask_digest(binary),
                  "algorithm_type": algorithm_type, "creator": creator,
                  **lesion_report(binary, None, split["distance"] if split else None),
                  "location": split["location"] if split else None,
                  "brain_model": split["brain_model"] if split else None,
                  "brain_model_sha256": split["brain_model_sha256"] if split else None,
                  "brain_mask": None if not split or split["brain_model"] is None else (
                      BRAIN_MASK_GATES_VENTRICLES if brain_gate else BRAIN_MASK_NOT_APPLIED),
                  "intracranial_ml": split["intracranial_ml"] if split else None,
                  "device": split["device"] if split else None, "runner": split["runner"] if split else None,
                  "model": None, "model_sha256": [], "deepwml_version": __version__}
        instances = dicom_instances(chosen[0], binary) if chosen else None
        add_instance_numbers(report, instances)  # as segment writes them
        if split is None:
            report["location_why"] = location_left_out() if asked_location else LOCATION_OFF
        said = list(split["warnings"]) if split else []
        if chosen:
            report["dicom_series"] = chosen[0].as_dict(chosen[1])
            said += dicom_series_warnings(chosen[0], chosen[1], image)
        else:
            said += scan_header_warnings(flair)
        values, ignored, heard = labels
        said += heard  # e.g. a change segmentation's gone lesions left out, several segments joined
        if ignored:
            said.append(f"{mask.name} holds label {IGNORE_LABEL} (ignore: other pathology, as deepwml evaluate reads "
                        f"it) in {ignored} voxels beside label 1: left out of the lesions")
        kept = [v for v in values if not (ignored and v == IGNORE_LABEL)]
        if kept and max(kept) > 1:
            said.append(f"{mask.name} holds labels up to {max(kept)}: every non-zero voxel was taken as lesion")
        if dicom_outline and not outline:
            said.append(NO_DICOM_OUTLINE)
        if dicom_seg and not seg:
            said.append(NO_DICOM_SEG)
        report["warnings"] = said
        # everything made before anything is written: a failure leaves no half set of outputs
        if qc:
            from .qc import png_bytes, render

            # the ventricles the split measured from outlined, as segment's picture outlines them
            picture = png_bytes(render(image, binary, title=picture_title(case, report),
                                       ventricles=split["ventricles"] if split else None, slice_labels=instances))
        if outline:
            from .dicom_outline import outline_series

            how = "edited by hand" if algorithm_type == "SEMIAUTOMATIC" else (
                "drawn by hand" if algorithm_type == "MANUAL" else "by DeepWML")
            if creator:  # a Secondary Capture has no Content Creator's Name: the derivation names them
                how += f" by {creator}"
            prepared = outline_series(image, binary, chosen[0], report, derivation=(
                f"WMH outlined in red, {how} ({algorithm_type}), exported by DeepWML {__version__}: "
                f"{report['volume_ml']:.2f} ml, {report['lesion_count']} lesion(s). Research use, not for diagnosis."))
        if seg:
            from .dicom_seg import segmentation

            segmented = segmentation(image, binary, chosen[0], report, algorithm_type, creator)
        with whole_or_none(paths):
            # the journal listing what this run writes and removes (killed outright, its files are listed), then with
            # --overwrite the report (stopped part way, no report describes other files), then an earlier export's
            # outputs this one does not write (it had --qc, this has not), under segment's rule
            start_outputs(out, case, paths, overwrite, protected, list(export_paths(out, case, True, True, True).values()))
            write_qc_and_dicom(report, paths, overwrite, picture if qc else None, prepared if outline else None,
                               segmented if seg else None)
            report["outputs"] = sorted(p.name for p in paths.values())
            report["seconds"] = round(time.perf_counter() - start, 3)
            finish_report(paths["report"], json.dumps(report, indent=1))  # the journal's end
    for text in said:
        warnings.warn(text, stacklevel=2)
    return report


def register(subparsers) -> None:
    from .cli import add_debug_flag
    from .dicom_seg import ALGORITHM_TYPES

    p = subparsers.add_parser(
        "export", help="make the report, DICOM SEG, outline series or QC picture of a mask (one corrected by hand, or "
                       "a rater's)",
        description="Make the outputs deepwml segment makes of its own mask from a mask given: one corrected by hand "
                    "(Slicer, ITK-SNAP) or a rater's, to send to PACS. FLAIR: the scan the mask was drawn on (an image "
                    "file, a DICOM series folder, or a study's folder: its FLAIR is picked); MASK: any mask file "
                    "DeepWML reads (NIfTI, NRRD, .seg.nrrd, DICOM SEG), on the FLAIR's grid (a mask saved cropped "
                    "on its voxels is padded). Writes CASE_report.json (the mask's volume, lesions and LV groups; "
                    "with a ventricle model, the periventricular/deep split as deepwml segment makes it).")
    p.add_argument("flair", metavar="FLAIR", help="the FLAIR: an image file or a DICOM folder")
    p.add_argument("mask", metavar="MASK", help="the mask to export, on the FLAIR's grid (any non-zero voxel a lesion)")
    p.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR")
    p.add_argument("--case", metavar="NAME", help="the case's name, which begins the output files' (default: the "
                   "FLAIR's file or folder name)")
    p.add_argument("--series", metavar="TEXT", help="in a DICOM folder holding several series, the FLAIR's: its series "
                   "number, description or UID (as deepwml segment --series)")
    p.add_argument("--dicom-seg", action="store_true", help="also write CASE_wmh_seg.dcm: the mask as a DICOM "
                   "Segmentation object (SEG) of the FLAIR's study (a DICOM FLAIR only)")
    p.add_argument("--algorithm-type", default="SEMIAUTOMATIC", choices=ALGORITHM_TYPES,
                   help="the SEG segment's Segment Algorithm Type: SEMIAUTOMATIC (default: a DeepWML mask corrected by "
                        "hand), MANUAL (drawn by a rater: no algorithm named) or AUTOMATIC (DeepWML's mask unchanged)")
    p.add_argument("--creator", metavar="FAMILY^GIVEN", help="who edited or drew the mask, as a DICOM Person Name "
                   "(Family^Given, at most 5 ^-separated parts): the SEG's Content Creator's Name, named in the outline "
                   "series and recorded in the report (without it, no person is named)")
    p.add_argument("--ventricle-model", metavar="FILE", help="lateral-ventricle model for the periventricular/deep "
                   "split, made as deepwml segment makes it (its ventricle and brain networks run on the FLAIR; "
                   "default: the model registry's default ventricle model, which the shipped registry does not mark)")
    p.add_argument("--no-location", action="store_true", help="no periventricular/deep split, even when the model "
                   "registry marks a ventricle model default")
    p.add_argument("--brain-model", metavar="FILE", help="brain-mask model file for the split: the ventricles are kept "
                   "inside its intracranial mask, as deepwml segment keeps them, and it gives intracranial_ml (default: "
                   "the shipped brain-mask model; only with a split)")
    p.add_argument("--no-brain-mask", action="store_true", help="the ventricles not kept inside the brain mask, as "
                   "with deepwml segment --no-brain-mask (the mask is still made for intracranial_ml; only with a split)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the ventricle and brain "
                   "networks run (default: auto)")
    p.add_argument("--dicom-outline", action="store_true", help="also write CASE_outline_dicom/: the FLAIR with the "
                   "mask's lesions outlined in red, as a new series of its study (a DICOM FLAIR only)")
    p.add_argument("--qc", action="store_true", help="also write CASE_qc.png: axial slices with the mask outlined")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export's outputs of the case")
    add_debug_flag(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    if args.no_location and args.ventricle_model:
        raise UsageError("--no-location cannot go with --ventricle-model")
    if args.no_location and (args.brain_model or args.no_brain_mask):  # they shape the split alone (export_case)
        raise UsageError(f"--no-location cannot go with {'--brain-model' if args.brain_model else '--no-brain-mask'}: "
                         "the brain mask shapes only the periventricular/deep split, which --no-location leaves out")
    report = export_case(args.flair, args.mask, args.output_dir, args.case, args.dicom_seg, args.dicom_outline, args.qc,
                         args.overwrite, args.series, args.algorithm_type, args.creator,
                         None if args.no_location else (args.ventricle_model or "default"), args.device,
                         args.brain_model or "default", not args.no_brain_mask)
    from .report import lesion_count_text

    print(f"{report['case']}: {report['volume_ml']:.2f} ml, {lesion_count_text(report['lesion_count'])}; "
          f"{', '.join(report['outputs'])} in {args.output_dir}", file=sys.stderr)
    return 0
