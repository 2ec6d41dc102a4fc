import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(SAMPLE_TEXT * 4)
    return p


@pytest.fixture
def model_dir(tmp_path):
    """A tiny dense Llama (GQA) folder with a tokenizer, as a user would have on disk."""
    from soco_llm import save_dense

    out = tmp_path / "tiny-llama"
    save_dense(tiny_model("llama"), tiny_tokenizer(), out)
    return out
