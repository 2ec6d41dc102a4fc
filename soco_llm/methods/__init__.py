"""Compression methods: each is a config class and a handler, registered once in `base.register`.

Importing this package registers the built-in methods, the SVD family (`svd_family`) and SoCo (`soco`),
then any installed package that names a module under the `soco_llm.methods` entry-point group (importing it
registers its method): a new method is its own package, and nothing here or in the CLI changes.
"""

from importlib.metadata import entry_points

from .base import (METHODS, CalibrationConfig, CompressionConfig, MethodResult, config_for, config_from_dict,
                   register)
from .svd_family import ASVDConfig, FWSVDConfig, SVDConfig, SVDLLMConfig  # noqa: I001  registers first
from .soco import SoCoConfig
from ..learned.recut import export_from_run

for _entry in entry_points(group="soco_llm.methods"):
    _entry.load()

__all__ = ["ASVDConfig", "CalibrationConfig", "CompressionConfig", "FWSVDConfig", "METHODS",
           "MethodResult", "SVDConfig", "SVDLLMConfig", "SoCoConfig", "config_for", "config_from_dict", "export_from_run",
           "register"]
