"""DeepWMLLib: white matter hyperintensity segmentation on FLAIR MRI (pure Python, no Slicer)."""

from pathlib import Path

__version__ = "0.1.0"


def resources_dir() -> Path:
    """The folder of the shipped models (Models/) and the sample FLAIR (Sample/): inside the package where it was
    installed from a wheel or an sdist (pyproject.toml puts Resources/ there), else Resources/ beside the package,
    as in the source tree, an editable install and the Slicer extension."""
    package = Path(__file__).resolve().parent
    installed = package / "Resources"
    return installed if installed.is_dir() else package.parent / "Resources"
