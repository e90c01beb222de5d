"""The Slicer side of DeepWML: MRML <-> SimpleITK conversion and the module's logic (no GUI).

Kept in a package, as SlicerNNUNet does, so that Slicer does not mistake helper files for modules.
Importing it makes DeepWMLLib importable: an installed extension has DeepWMLLib next to this package
in qt-scripted-modules (already on sys.path); a source checkout has it one folder further up.
"""

import sys
from pathlib import Path


def _addLibraryPath() -> None:
    moduleFolder = Path(__file__).resolve().parents[1]
    for folder in (moduleFolder, moduleFolder.parent):
        if (folder / "DeepWMLLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


_addLibraryPath()
