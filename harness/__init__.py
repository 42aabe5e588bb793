"""medsam-harness: evaluate and benchmark box-prompted medical image segmenters.

The public surface for plugin authors::

    from harness import hookimpl, SegmenterSpec, LoadOptions, Reported, Case
"""
from harness.cases import Case, CaseError
from harness.hookspecs import hookimpl
from harness.plugin_api import LoadOptions, Reported, Segmenter, SegmenterSpec

__version__ = "0.1.0"

__all__ = ["Case", "CaseError", "LoadOptions", "Reported", "Segmenter", "SegmenterSpec", "hookimpl", "__version__"]
