"""The smallest stand-ins for what slicer-core lacks and DeepWML.py imports: qt, slicer.app,
slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper and slicer.util.loadUI.

Everything MRML stays real (slicer-core). The stand-in widgets are built from DeepWML.ui itself, so a
widget name the code uses but the .ui lacks fails as it would in Slicer; signals are recorded and
fired by the tests. `install(monkeypatch)` puts them in place for one test only.
"""

from __future__ import annotations

import inspect
import pathlib
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET

import slicer

# ---------------------------------------------------------------------------------------------
# Widgets from the .ui file


class Widget:
    """A Qt widget as PythonQt shows it: properties are attributes, signals are connected by name."""

    def __init__(self, className: str, name: str):
        self._className = className
        self.objectName = name
        self.connections: dict[str, list] = {}
        self.text = ""
        self.enabled = True
        self.visible = True
        self.value = 0
        self.items: list[str] = []
        self.itemData: dict = {}
        self.currentIndex = -1
        self.scene = None
        self.rows: list[list] = []
        self.headers: list[str] = []
        self._currentRow = -1

    def __setattr__(self, name, value):
        changed = name == "currentIndex" and getattr(self, "currentIndex", value) != value
        object.__setattr__(self, name, value)
        if changed:  # Qt emits when the index changes, including by assignment
            self.emit("currentIndexChanged(int)", value)

    def className(self) -> str:
        return self._className

    def connect(self, signal: str, slot) -> None:
        self.connections.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        for slot in self.connections.get(signal, []):
            slot(*args[: _positionalParameters(slot)])  # PythonQt drops what the slot does not take

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    # QComboBox
    @property
    def count(self) -> int:
        return len(self.items)

    def addItem(self, text: str) -> None:
        self.items.append(text)
        if self.currentIndex < 0:
            self.currentIndex = 0

    def setItemData(self, index: int, value, role) -> None:
        self.itemData[(index, role)] = value

    def findText(self, text: str) -> int:
        return self.items.index(text) if text in self.items else -1

    def itemText(self, index: int) -> str:
        return self.items[index]

    # QTableWidget
    def clearContents(self) -> None:
        self.rows = [[None] * len(row) for row in self.rows]

    def setColumnCount(self, count: int) -> None:
        self.rows = [row[:count] + [None] * (count - len(row)) for row in self.rows]

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.headers = list(labels)

    def setRowCount(self, count: int) -> None:
        width = len(self.headers)
        self.rows = (self.rows + [[None] * width for _ in range(count)])[:count]

    def setItem(self, row: int, column: int, item) -> None:
        self.rows[row][column] = item

    def currentRow(self) -> int:
        return self._currentRow

    def selectRow(self, row: int) -> None:
        self._currentRow = row
        self.emit("itemSelectionChanged()")

    def click(self) -> None:
        if self.enabled:  # as QAbstractButton.click(): a greyed-out button does nothing
            self.emit("clicked(bool)", False)


def _positionalParameters(function) -> int:
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return 99
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


class UIRoot(Widget):
    def __init__(self, path):
        super().__init__("qMRMLWidget", "DeepWML")
        self.children = {}
        for element in ET.parse(path).getroot().iter("widget"):
            child = Widget(element.get("class"), element.get("name"))
            child.parameterName = element.findtext("property[@name='SlicerParameterName']/string")
            self.children[element.get("name")] = child

    def setMRMLScene(self, scene) -> None:  # the .ui connects mrmlSceneChanged to every node selector
        super().setMRMLScene(scene)
        for child in self.children.values():
            child.setMRMLScene(scene)


def loadUI(path):
    return UIRoot(path)


def childWidgetVariables(root):
    return types.SimpleNamespace(**root.children)


class Layout:
    def __init__(self):
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)


# ---------------------------------------------------------------------------------------------
# qt


class QTimer:
    def __init__(self):
        self.interval = 0
        self.active = False
        self.slots = []

    def setInterval(self, msec: int) -> None:
        self.interval = msec

    def connect(self, signal: str, slot) -> None:
        assert signal == "timeout()"
        self.slots.append(slot)

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def fire(self) -> None:
        for slot in self.slots:
            slot()


class QTableWidgetItem:
    def __init__(self, text: str):
        self.text = text


class QFileDialog:
    nextPath = ""  # what the "user" picks
    offered = None  # the path the dialog offered last

    @staticmethod
    def getSaveFileName(parent, caption, path, filters) -> str:
        QFileDialog.offered = path
        return QFileDialog.nextPath


def _qtModule():
    qt = types.ModuleType("qt")
    qt.QTimer = QTimer
    qt.QTableWidgetItem = QTableWidgetItem
    qt.QFileDialog = QFileDialog
    qt.Qt = types.SimpleNamespace(ToolTipRole=3, UserRole=256, WaitCursor=3)
    qt.QEventLoop = types.SimpleNamespace(AllEvents=0, ExcludeUserInputEvents=1)
    # what slicer.util's message displays read before deciding whether to show a box
    qt.QMessageBox = types.SimpleNamespace(Ok=0x400, Cancel=0x400000, Information=1, Warning=2, Critical=3, Question=4)
    return qt


class DicomDatabase:
    """Slicer's DICOM database (ctkDICOMDatabase, `slicer.dicomDatabase`) as DeepWML asks it: the file of each image
    (SOP Instance UID) of the DICOM files in `folders`, "" for one it does not hold (as ctkDICOMDatabase answers)."""

    def __init__(self, *folders):
        import SimpleITK as sitk

        self.isOpen = True
        self.files = {}
        for folder in folders:
            for path in sorted(pathlib.Path(folder).iterdir()):
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                self.files[reader.GetMetaData("0008|0018").strip(" \0")] = str(path)

    def fileForInstance(self, uid: str) -> str:
        return self.files.get(uid, "")


MAIN_WINDOW = object()  # slicer.util.mainWindow() in the application; None under --no-main-window


class App:
    applicationName = "Slicer"

    def testingEnabled(self) -> bool:  # tryWithErrorDisplay logs instead of a dialog (and raises again, as always)
        return True

    def processEvents(self, flags=0) -> None:
        pass

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# slicer.ScriptedLoadableModule


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.moduleName = type(self).__name__[: -len("Widget")]
        self.layout = Layout()
        if not parent:  # as Slicer's: a widget made without a parent (console, tests) is set up at once
            self.setup()

    def setup(self) -> None:
        pass

    def resourcePath(self, filename: str) -> str:
        return str(pathlib.Path(sys.modules[type(self).__module__].__file__).parent / "Resources" / filename)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[: -len("Logic")]

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=1000) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# slicer.parameterNodeWrapper: values live in the real vtkMRMLScriptedModuleNode, as in Slicer


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class _NoNone:
    """Marks a Union without None: real Slicer's UnionSerializer cannot write None for it (a TypeError
    when the wrapper writes its default, or when a selector is set back to None)."""


def baseType(annotation):
    """(type, annotations) of a possibly Annotated type; a Union of nodes becomes vtkMRMLNode."""
    extras = ()
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        if type(None) not in typing.get_args(annotation):
            extras = (*extras, _NoNone())
        annotation = slicer.vtkMRMLNode
    return annotation, tuple(extras)


def parameterNodeWrapper(cls):
    fields = {name: baseType(annotation) for name, annotation in cls.__annotations__.items()}

    def default(name):
        kind = fields[name][0]
        if hasattr(cls, name):
            return getattr(cls, name)
        return None if issubclass(kind, slicer.vtkMRMLNode) else kind()

    class Wrapper:
        allFields = fields

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            for name in fields:
                if not parameterNode.GetParameter(name) and not parameterNode.GetNodeReferenceID(name):
                    setattr(self, name, default(name))

        def __getattr__(self, name):
            if name not in fields:
                raise AttributeError(name)
            kind = fields[name][0]
            if issubclass(kind, slicer.vtkMRMLNode):
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            return text == "True" if kind is bool else kind(text)

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name}")
            kind, extras = fields[name]
            for extra in extras:
                if isinstance(extra, Choice) and value not in extra.choices:
                    raise ValueError(f"{value!r} is not one of {extra.choices}")
                if isinstance(extra, _NoNone) and value is None:
                    raise TypeError(f"Unable to write value 'None' of parameter {name}: its Union has no None")
            if issubclass(kind, slicer.vtkMRMLNode):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, str(value))

        def connectGui(self, ui):
            """As Slicer's QComboBox connector does on connecting: a Choice's combo box filled again with its
            choices (what was set on its items before is gone)."""
            for widget in vars(ui).values():
                choice = [e for e in fields.get(getattr(widget, "parameterName", None), (None, ()))[1]
                          if isinstance(e, Choice)]
                if choice and widget.className() == "QComboBox":
                    widget.items, widget.itemData, widget.currentIndex = [], {}, -1
                    for item in choice[0].choices:
                        widget.addItem(str(item))
            return ui

        def disconnectGui(self, tag) -> None:
            pass

        def AddObserver(self, *args):
            return self.parameterNode.AddObserver(*args)

        def RemoveObserver(self, *args):
            return self.parameterNode.RemoveObserver(*args)

    Wrapper.__name__ = Wrapper.__qualname__ = cls.__name__
    return Wrapper


# ---------------------------------------------------------------------------------------------


def install(monkeypatch) -> None:
    """Install the stand-ins for one test (monkeypatch undoes everything afterwards)."""
    monkeypatch.setitem(sys.modules, "qt", _qtModule())
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for item in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                 ScriptedLoadableModuleTest):
        setattr(scripted, item.__name__, item)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.Choice, wrapper.WithinRange = parameterNodeWrapper, Choice, WithinRange
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setattr(slicer, "app", App(), raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", loadUI)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", childWidgetVariables)
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: MAIN_WINDOW)  # the application with its window
    QFileDialog.nextPath = ""
    QFileDialog.offered = None
