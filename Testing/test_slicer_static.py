"""Static checks of the Slicer extension that need no Slicer: the .ui file, its bindings to the
parameter node, the widget's rules, the icon, and that CMake packages every file the module needs
(a file missing from CMakeLists.txt works from the source tree but vanishes from the extension)."""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO

MODULE = REPO / "DeepWML"
UI = MODULE / "Resources" / "UI" / "DeepWML.ui"
SOURCE = (MODULE / "DeepWML.py").read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)

# Which widget class Slicer's parameterNodeWrapper can bind to which parameter type
# (slicer/parameterNodeWrapper/guiConnectors.py).
CONNECTORS = {
    "bool": {"QCheckBox", "QPushButton"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "int": {"QSpinBox", "QSlider"},
    "str": {"QLineEdit", "QTextEdit"},
    "choice": {"QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}
UNBOUND_PARAMETERS = {"modelName"}  # the model list comes from models.json at run time: bound by hand


def uiWidgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def stringProperty(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop.find("string").text
    return None


def parameterAnnotations() -> dict[str, str]:
    cls = next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "DeepWMLParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def kindOf(annotation: str) -> str:
    if "vtkMRML" in annotation:
        return "node"
    if "Choice(" in annotation:
        return "choice"
    if "Path" in annotation:
        return "path"
    return re.search(r"\b(bool|float|int|str)\b", annotation).group(1)


def test_ui_file_is_valid_qt_designer_xml_with_an_mrml_root():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.find("widget").get("class") == "qMRMLWidget"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate object names"


def test_every_ui_name_the_code_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used, "the widget uses no .ui names?"
    missing = used - set(uiWidgets())
    assert not missing, f"DeepWML.py uses {sorted(missing)}, which DeepWML.ui does not define"


def test_every_parameter_is_bound_to_a_widget_that_can_show_its_type():
    annotations = parameterAnnotations()
    bound = {}
    for name, widget in uiWidgets().items():
        parameter = stringProperty(widget, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in annotations, f"{name} binds unknown parameter {parameter!r}"
        assert parameter not in bound, f"{parameter} is bound twice"
        bound[parameter] = widget
        kind = kindOf(annotations[parameter])
        assert widget.get("class") in CONNECTORS[kind], f"{name} ({widget.get('class')}) cannot show a {kind}"
        if widget.get("class") == "ctkSliderWidget":
            assert "WithinRange" in annotations[parameter], f"{parameter}: a slider needs a bounded float"
        if kind == "node":
            types = {s.text for s in widget.find("property[@name='nodeTypes']/stringlist")}
            assert types == set(re.findall(r"vtkMRML\w+", annotations[parameter])), name
    assert set(annotations) - set(bound) == UNBOUND_PARAMETERS


def test_node_selectors_get_the_scene():
    connected = {c.findtext("receiver") for c in ET.parse(UI).getroot().iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {n for n, w in uiWidgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= connected


def widgetClass() -> ast.ClassDef:
    return next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == "DeepWMLWidget")


def test_widget_does_no_numerics_and_no_file_io():
    forbidden = {"np", "numpy", "torch", "sitk", "SimpleITK", "open", "Path", "json", "csv", "DeepWMLLib"}
    names = {n.id for n in ast.walk(widgetClass()) if isinstance(n, ast.Name)}
    assert not names & forbidden
    imports = [n for n in ast.walk(widgetClass()) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not imports
    topLevel = {alias.name.split(".")[0] for n in TREE.body if isinstance(n, (ast.Import, ast.ImportFrom))
                for alias in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert not topLevel & {"numpy", "torch", "SimpleITK", "DeepWMLLib"}


def test_widget_calls_logic_only_inside_try_with_error_display():
    """Every call of the logic from the widget is inside tryWithErrorDisplay, or inside a try whose
    handler catches Exception and shows it itself (where set-up or an update must go on)."""
    def catchesAll(node) -> bool:
        return any(h.type is None or ast.unparse(h.type) in ("Exception", "BaseException") for h in node.handlers)

    def guarded(node, inside=False):
        if isinstance(node, ast.With) and any("tryWithErrorDisplay" in ast.unparse(i.context_expr) for i in node.items):
            inside = True
        if isinstance(node, ast.Try) and catchesAll(node):
            for child in node.body:
                yield from guarded(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                yield from guarded(child, inside)
            return
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("self.logic."):
            method = ast.unparse(node.func).split(".")[2]
            if method != "getParameterNode" and not inside:
                yield ast.unparse(node)
        for child in ast.iter_child_nodes(node):
            yield from guarded(child, inside)

    unguarded = list(guarded(widgetClass()))
    assert not unguarded, f"logic called outside tryWithErrorDisplay: {unguarded}"


def test_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "DeepWML.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


# ---------------------------------------------------------------------------------------------
# CMake


def cmakeList(path, variable: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    match = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    assert match, f"{path} does not set {variable}"
    return [item.replace("${MODULE_NAME}", "DeepWML") for item in match.group(1).split()]


def filesUnder(folder, pattern: str, relativeTo) -> set[str]:
    return {p.relative_to(relativeTo).as_posix() for p in folder.rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("variable, folder, pattern, base", [
    ("MODULE_PYTHON_SCRIPTS", MODULE, "*.py", MODULE),
    ("MODULE_PYTHON_RESOURCES", MODULE / "Resources", "*", MODULE),
    ("DeepWMLLib_PYTHON_SCRIPTS", REPO / "DeepWMLLib", "*.py", REPO),
    ("DeepWMLLib_PYTHON_RESOURCES", REPO / "Resources" / "Models", "*", REPO),
])
def test_cmake_packages_every_file_and_only_existing_ones(variable, folder, pattern, base):
    listed = set(cmakeList(MODULE / "CMakeLists.txt", variable))
    onDisk = filesUnder(folder, pattern, base)
    assert not onDisk - listed, f"add to {variable} in DeepWML/CMakeLists.txt: {sorted(onDisk - listed)}"
    assert not listed - onDisk, f"{variable} lists files that do not exist: {sorted(listed - onDisk)}"


def test_shipped_models_of_the_registry_are_packaged():
    import json

    registry = json.loads((REPO / "Resources" / "Models" / "models.json").read_text(encoding="utf-8"))
    listed = set(cmakeList(MODULE / "CMakeLists.txt", "DeepWMLLib_PYTHON_RESOURCES"))
    assert {f"Resources/Models/{m['file']}" for m in registry["models"]} <= listed


def test_top_level_cmake_is_a_slicer_extension_depending_on_pytorch():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                     "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(DeepWML)" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    module = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in module and "WITH_GENERIC_TESTS" in module


def test_icon_and_screenshot_urls_name_files_of_this_repository():
    """The catalogue URLs point at files of the published main branch: those files must exist here."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', text).group(1)
    raw = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in re.search(rf'set\({variable} "([^"]+)"\)', text).group(1).split():
            assert url.startswith(raw), url
            assert (REPO / url[len(raw):]).is_file(), url
