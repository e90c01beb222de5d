"""README's command lines against the parsers they describe: a new user copies them, so every option written
there must exist as spelled, the synopses of `deepwml segment` and of the Slicer batch script must list every
option there is, and the defaults README states must be the code's. (The bad-input table has its own check,
test_bad_inputs.test_readme_table_matches.)"""

from __future__ import annotations

import ast
import re

import pytest

from DeepWMLLib.cli import build_parser
from DeepWMLLib.postprocessing import DEFAULT_MIN_LESION_MM3
from DeepWMLLib.realbg import FAINT_RATIO

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def options() -> dict[str, set[str]]:
    """Each sub-command's option strings."""
    return {name: {o for action in sub._actions for o in action.option_strings}
            for name, sub in build_parser().commands.items()}


def code_blocks() -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", README, re.S)


def block_starting(text: str) -> str:
    found = [block for block in code_blocks() if block.startswith(text)]
    assert len(found) == 1, f"README has {len(found)} code blocks starting {text!r}"
    return found[0]


def command_lines() -> list[tuple[str, str, str]]:
    """(command, the options' text, the README line) for every command written in a README code block: a
    `deepwml CMD` line (or torchrun's `-m DeepWMLLib.train`) up to its comment, the lines it continues onto with
    a backslash, and the bracketed options (`[--x N]`) of the comment lines under it."""
    found = []
    for block in code_blocks():
        command, continued = None, False
        for line in block.splitlines():
            started = re.match(r"\s*(?:deepwml (\w+)|torchrun .*-m DeepWMLLib\.(\w+))(.*)", line)
            if started and not line.lstrip().startswith("#"):
                command, text = started.group(1) or started.group(2), started.group(3).split(" #")[0]
            elif continued:
                text = line.split(" #")[0]
            elif command and line.lstrip().startswith("#"):
                text = " ".join(group for group in re.findall(r"\[([^\]]*)\]", line) if group.startswith("--"))
            else:
                continue
            continued = text.rstrip().endswith("\\")
            found.append((command, text, line))
    return found


def test_every_option_on_a_readme_command_line_exists():
    known = options()
    lines = command_lines()
    assert len(lines) > 30, "README's command lines were not found"
    wrong = [f"deepwml {command} {option}: {line.strip()}" for command, text, line in lines
             for option in OPTION.findall(text) if option not in known.get(command, ())]
    assert not wrong, "README writes options the command does not have:\n" + "\n".join(wrong)


def test_every_option_in_readme_inline_commands_exists():
    """`deepwml segment --precision`-like spans in README's prose."""
    known = options()
    spans = re.findall(r"`deepwml (\w+)([^`]*)`", README)
    assert len(spans) > 30
    wrong = [f"`deepwml {command}{text}`" for command, text in spans
             if command not in known or any(option not in known[command] for option in OPTION.findall(text))]
    assert not wrong, "README names options the command does not have: " + ", ".join(wrong)


def test_segment_synopsis_lists_every_option():
    synopsis = set(OPTION.findall(block_starting("deepwml segment INPUT")))
    have = {o for o in options()["segment"] if o.startswith("--")} - {"--help", "--output-dir"}
    assert synopsis == have, f"missing from README: {sorted(have - synopsis)}; not options: {sorted(synopsis - have)}"


def batch_script_options() -> set[str]:
    """The options segment_batch.py's parser adds (read from its source: running it needs slicer-core)."""
    tree = ast.parse((REPO / "DeepWML" / "Scripts" / "segment_batch.py").read_text(encoding="utf-8"))
    return {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")}


def test_batch_script_synopsis_lists_every_option():
    block = block_starting("Slicer --no-main-window --python-script")
    synopsis = set(OPTION.findall(block.split("segment_batch.py", 1)[1]))
    have = batch_script_options()
    assert len(have) > 10
    assert synopsis == have, f"missing from README: {sorted(have - synopsis)}; not options: {sorted(synopsis - have)}"


# (command, option, README's words that state its default, the default they state)
STATED_DEFAULTS = [
    ("segment", "--min-lesion-mm3", "`--min-lesion-mm3` (default 5)", 5),
    ("segment", "--exclude-edge-slices", "10 % of axial slices (MICCAI winner, off by default", 0),
    ("evaluate", "--found-fraction", "[--found-fraction 0.4]", 0.4),
    ("evaluate", "--size-bounds", "[--size-bounds 20 150]", (20, 150)),
    ("evaluate", "--size-unit", "[--size-unit voxels|mm3]", "voxels"),
    ("consensus", "--threshold", "[--threshold 0.85]", 0.85),
    ("change", "--tolerance-mm", "within 2 mm of it (`--tolerance-mm`)", 2),
    ("change", "--presence", "reaches 0.15 (`--presence`", 0.15),
    ("change", "--enlarge-fraction", "(`--enlarge-fraction 1`)", 1),
    ("change", "--enlarge-min-ml", "by 0.05 ml at least (`--enlarge-min-ml`)", 0.05),
    ("change", "--min-change-ml", "under 0.02 ml (`--min-change-ml`)", 0.02),
    ("adapt", "--crops-per-slice", "[--crops-per-slice 4]", 4),
    ("adapt", "--seed", "[--crops-per-slice 4] [--seed 0]", 0),
    ("synth", "--faint-ignore", "[--faint-ignore 1.12]: deep white matter this much brighter than the local normal "
     "white matter is\n#   marked 2 too (the default", 1.12),
    ("train", "--widen-noise", "[--widen-noise 0.01]", 0.01),
]

# options whose parser default is None and whose code then takes a constant
RESOLVED = {("segment", "--min-lesion-mm3"): DEFAULT_MIN_LESION_MM3, ("synth", "--faint-ignore"): FAINT_RATIO}


@pytest.mark.parametrize("command, option, words, stated", STATED_DEFAULTS,
                         ids=[f"{c} {o}" for c, o, _, _ in STATED_DEFAULTS])
def test_defaults_readme_states_are_the_code_s(command, option, words, stated):
    assert words in README, f"README no longer says {words!r}: update this test with README"
    action = next(a for a in build_parser().commands[command]._actions if option in a.option_strings)
    default = action.default if action.default is not None else RESOLVED[(command, option)]
    if isinstance(stated, str):
        assert default == stated
    elif isinstance(stated, tuple):
        assert tuple(default) == stated
    else:
        assert float(default) == pytest.approx(stated)


def test_change_qc_help_names_every_colour_readme_gives():
    """`deepwml change --help` said the picture shows new, enlarging, stable and gone lesions; it shows all seven
    calls, as README says, and a user meeting pink or grey ones finds them in --help too."""
    words = re.search(r"`CASE_change_qc\.png` with `--qc` \(the follow-up's slices, (.*?), under a legend", README, re.S)
    assert words, "README's words on CASE_change_qc.png were not found"
    colours = [" ".join(pair.split()) for pair in words.group(1).split(",")]
    assert len(colours) == 7
    action = next(a for a in build_parser().commands["change"]._actions if "--qc" in a.option_strings)
    shown = " ".join(action.help.split())
    assert [c for c in colours if c not in shown] == []


def test_the_accuracy_said_up_front_is_the_shipped_defaults():
    """README's top paragraph and the Slicer module's help text quote the default model's median Dice, which the
    'shipped default' paragraph states with the model card; a new default must change all three, or a reader is
    told another model's accuracy."""
    figures = r"(0\.\d{3})\D+?(?:at )?5 mm\D+?(0\.\d{3}) at 8 mm\D+?(0\.\d{3}) at 1 mm"
    up_front = re.search(r"\*\*How accurate is it.*?Median Dice per case \*\*" + figures, README, re.S)
    default = re.search(r"\*\*The shipped default\*\*.*?its median Dice is " + figures, README, re.S)
    assert up_front and default, "README no longer states the default model's figures where this test looks"
    assert up_front.groups() == default.groups()
    help_text = (REPO / "DeepWML" / "DeepWML.py").read_text(encoding="utf-8")
    said = re.search(r"median Dice of (0\.\d\d) on 5 mm slices", help_text)
    assert said and float(said.group(1)) == round(float(default.group(1)), 2)


def test_the_networks_share_of_progress_readme_gives_is_the_code_s():
    """README's Python API paragraph said the networks take `progress` to 0.85: they take it to 0.7 since the steps
    after them (post-processing, the report, the FLAIR check) say so as they begin, and a caller that maps the
    fraction onto its own bar goes by README."""
    from DeepWMLLib.segment import NETWORK_SHARE

    said = re.search(r"\(the networks take it to ([0-9.]+), post-processing", README)
    assert said, "README no longer says where the networks take progress: update this test with README"
    assert float(said.group(1)) == NETWORK_SHARE


def test_readme_names_every_setting_a_report_records():
    """README's list of the report's `settings` (those a rerun must share to skip a case) left out `grid_phases`,
    which the report records and a rerun checks."""
    from DeepWMLLib.segment import result_settings

    said = re.search(r"`settings` \(the settings that shaped the result.*?\), `model` and `model_sha256` \(the first",
                     README, re.S)
    assert said, "README no longer lists the report's settings where this test looks: update this test with README"
    recorded = result_settings([], 0.5, False, None, 0.0, None, None, None)
    assert [key for key in recorded if f"`{key}`" not in said.group(0)] == []


def test_the_metric_definitions_readme_gives_are_the_code_s():
    """README's short definitions are what a user reads to compare `deepwml evaluate`'s figures with published
    ones; they did not say which 2D images the per-image figures cover, nor the LV-group and lesion-size bounds,
    so a user could not tell whether slices marked only by the prediction counted. Each stated rule is checked
    against the code: the bounds against its constants, the per-image rule on a case."""
    import math

    import numpy as np
    import SimpleITK as sitk

    from DeepWMLLib import metrics

    said = re.search(r"Definitions and empty-mask conventions of every metric.*?\n\nThe training", README, re.S)
    assert said, "README's definitions of the metrics were not found: update this test with README"
    text = " ".join(said.group(0).split())
    groups = " ≤ ".join(f"{g} < {b:g}" for g, b in zip(metrics.LV_GROUPS, metrics.LV_GROUP_BOUNDS_ML))
    assert groups.replace("G1 < 0.2", "G1 < 0.2 ml") + f" ≤ {metrics.LV_GROUPS[-1]}" in text
    small, large = metrics.SIZE_BOUNDS_VOXELS
    assert f"small < {small} ≤ medium ≤ {large} < large voxels" in text
    assert f"{metrics.FOUND_FRACTION:.0%}".replace("%", " %") + " from either side" in text
    assert "A slice marked only by the prediction is not one of them" in text
    assert "a slice the prediction leaves empty has Dice 0, sensitivity 0 and no precision" in text

    ref, pred = np.zeros((6, 9, 9), np.uint8), np.zeros((6, 9, 9), np.uint8)
    ref[1, 2:5, 2:5] = ref[2, 2:5, 2:5] = 1
    pred[1, 2:5, 2:4] = 1  # slice 2 left empty
    pred[4, 6:8, 6:8] = 1  # a slice marked only by the prediction
    rows = metrics.slice_metrics(*(sitk.GetImageFromArray(a) for a in (pred, ref)))
    assert [r["index"] for r in rows] == [1, 2]
    assert (rows[1]["dice"], rows[1]["sensitivity"]) == (0.0, 0.0) and math.isnan(rows[1]["precision"])


def test_every_image_format_read_is_named_where_inputs_are_listed():
    """`deepwml segment --help` and README's batch-script paragraph listed .nii, .nii.gz, .nrrd, .nhdr, .mha and .mhd,
    leaving out the NIfTI-1 pairs (.hdr + .img, .hdr.gz + .img.gz) that both read as cases: a user with SPM's pairs
    read that they are not taken."""
    from DeepWMLLib.io import IMAGE_EXTENSIONS

    help_text = build_parser().commands["segment"].description
    segment_words = re.search(r"`INPUT` is an image file \((.*?)\),\n", README, re.S)
    batch_words = re.search(r"Every image file \((.*?)\)\s+in `IN` is a case", README, re.S)
    assert segment_words and batch_words, "README's lists of image files were not found: update this test with README"
    for ext in IMAGE_EXTENSIONS:
        assert ext in help_text, f"deepwml segment --help does not name {ext}"
        assert f"`{ext}`" in segment_words.group(1), f"README's INPUT paragraph does not name {ext}"
        assert f"`{ext}`" in batch_words.group(1), f"README's batch-script paragraph does not name {ext}"


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: the heading's text without its inline markup, lower
    case, every character but letters, digits, `_`, `-` and spaces dropped, spaces made `-`; a repeated anchor gets
    -1, -2, ... Lines in fenced code blocks (a `# comment` in a bash block) are no headings."""
    anchors: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"#{1,6} +(.*?)[ #]*$", line)
        if not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_heading_anchors_follow_githubs_rules():
    made = heading_anchors("# DeepWML\n## Set-up and first run (fresh machine, Python ≥ 3.10)\n```bash\n# 1. install\n"
                           "```\n### How it works, and how `io` is handled\n## Use\n## Use\n")
    assert made == {"deepwml", "set-up-and-first-run-fresh-machine-python--310", "how-it-works-and-how-io-is-handled",
                    "use", "use-1"}


def test_every_link_within_readme_and_to_its_files_resolves():
    """README's contents list and cross-references link to its own headings (`](#anchor)`) and to other files of
    the repository, some to a heading there (`](Testing/benchmarks/README.md#anchor)`): a heading renamed, or a
    file moved, leaves a link a newcomer clicks to nothing, and GitHub says nothing about it."""
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    own = heading_anchors(README)
    broken = []
    for target in links:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if path and not (REPO / path).exists():
            broken.append(target)
        elif anchor and anchor not in (heading_anchors((REPO / path).read_text(encoding="utf-8")) if path else own):
            broken.append(target)
    assert len([t for t in links if t.startswith("#")]) >= 15, "README's contents list was not found"
    assert broken == [], "README links to no heading or file: " + ", ".join(broken)
