"""Files: atomic writes (`atomic`), the compressed format (`format`), saving and loading (`save_load`),
and the transformers hook that loads compressed folders (`hf_quantizer`)."""

from .atomic import atomic_dir, atomic_save_tensors, atomic_write_json, atomic_write_text
from .format import read_compression
from .save_load import export_dense, load, merge_to_dense, save_compressed, save_dense

__all__ = ["atomic_dir", "atomic_save_tensors", "atomic_write_json", "atomic_write_text", "export_dense", "load",
           "merge_to_dense", "read_compression", "save_compressed", "save_dense"]
