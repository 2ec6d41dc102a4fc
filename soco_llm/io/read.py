"""Reading the files the tool did not just make, any of which may be damaged: safetensors and JSON.

Every reader here turns whatever a damaged file raises (a truncated header, a pickle renamed to
`.safetensors`, invalid JSON, an unreadable path) into one `SocoError` line that names the file and
says what to do (`remedy`), so no command ends in a traceback over a bad file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import SocoError, first_line



def read_tensors(path: str | os.PathLike, remedy: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on `device`; a missing, truncated or foreign file is one line."""
    path = Path(path)
    if not path.is_file():
        raise SocoError(f"{path} is missing; {remedy}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types, and OSError
        raise SocoError(f"{path} is not a readable safetensors file ({first_line(e)}); {remedy}") from None


def read_json(path: str | os.PathLike, remedy: str):
    """The JSON value in `path`; a missing, unreadable or invalid file is one line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SocoError(f"{path} is missing; {remedy}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SocoError(f"{path} is not valid JSON ({first_line(e)}); {remedy}") from None
