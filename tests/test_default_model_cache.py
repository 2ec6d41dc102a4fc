"""The bundled model's dense copy is made once, even when two commands start together on a fresh machine."""

import pytest

import soco_llm.models as models
from soco_llm.errors import SocoError
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCO_LLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / models.DEFAULT_GGUF).write_bytes(b"GGUF")
    monkeypatch.setattr(models, "package_dir", lambda name: tmp_path / "pkg")
    monkeypatch.setattr(models, "_from_gguf", lambda path, dtype: (tiny_model("llama"), tiny_tokenizer()))
    return tmp_path / "cache" / models.DEFAULT_MODEL


def test_the_process_that_loses_the_conversion_race_uses_the_winners_copy(fresh_cache, monkeypatch):
    real = models.save_dense

    def racing(model, tok, target, overwrite):  # the other process finishes first
        real(model, tok, target, overwrite=False)
        return real(model, tok, target, overwrite=overwrite)

    monkeypatch.setattr(models, "save_dense", racing)
    assert models.default_model_dir() == fresh_cache and (fresh_cache / "config.json").is_file()


def test_a_foreign_folder_in_the_cache_is_still_an_error(fresh_cache):
    fresh_cache.mkdir(parents=True)
    (fresh_cache / "notes.txt").write_text("mine")
    with pytest.raises(SocoError, match="already exists"):
        models.default_model_dir()
    assert (fresh_cache / "notes.txt").read_text() == "mine"
