"""Files: atomic writes and stale-leftover cleaning (`atomic`), the compressed format and its checks
(`format`), merging back to dense (`dense`), saving and loading (`save_load`), and the transformers hook
that loads compressed folders (`hf_quantizer`)."""

from .atomic import atomic_dir, atomic_save_tensors, atomic_write_json, atomic_write_text, clean_stale
from .dense import merge_to_dense
from .format import read_compression
from .rebuild import check_folder
from .save_load import export_dense, load, save_compressed, save_dense

__all__ = ["atomic_dir", "atomic_save_tensors", "atomic_write_json", "atomic_write_text", "check_folder",
           "clean_stale", "export_dense", "load", "merge_to_dense", "read_compression", "save_compressed",
           "save_dense"]
