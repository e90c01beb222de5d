"""DeepWMLLib: white matter hyperintensity segmentation on FLAIR MRI (pure Python, no Slicer)."""

__version__ = "0.1.0"
