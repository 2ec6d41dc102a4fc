"""Compression methods: each is a config class and a handler, registered once in `base.register`.

Importing this package registers the built-in methods: the SVD family (`svd_family`) and SoCo (`soco`).
"""

from .base import (METHODS, CalibrationConfig, CompressionConfig, Interrupted, MethodResult, config_for,
                   config_from_dict, register)
from .svd_family import ASVDConfig, FWSVDConfig, SVDConfig, SVDLLMConfig  # noqa: I001  registers first
from .soco import SoCoConfig, export_from_run

__all__ = ["ASVDConfig", "CalibrationConfig", "CompressionConfig", "FWSVDConfig", "Interrupted", "METHODS",
           "MethodResult", "SVDConfig", "SVDLLMConfig", "SoCoConfig", "config_for", "config_from_dict", "export_from_run",
           "register"]
