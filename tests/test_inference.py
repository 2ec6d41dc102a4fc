"""The fast inference path (static KV cache, compiled decode step) gives the plain path's tokens and logits,
for dense and compressed tiny models alike; `soco generate --fast` runs on a saved compressed folder."""

import pytest
import torch

import soco_llm
from soco_llm.cli import main
from tiny import random_windows, tiny_model


def _greedy(model, ids):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("compressed", [False, True])
def test_fast_path_gives_the_plain_paths_tokens_and_logits(compressed):
    model = tiny_model("llama").eval()
    if compressed:
        soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=0.4), random_windows(4, 32))
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    plain = _greedy(model, ids)
    soco_llm.fast_inference(model)
    for _ in range(2):  # the first call compiles, the second reuses the compiled step
        fast = _greedy(model, ids)
        assert fast.sequences.tolist() == plain.sequences.tolist()
        for a, b in zip(fast.logits, plain.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert hasattr(model, "_compiled_call")  # the decode step really went through torch.compile


def test_generate_fast_on_a_saved_compressed_folder(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "c"
    code = main(["compress", "--method", "svd-llm", "--ratio", "0.4", "--model", str(model_dir), "--out", str(out),
                 "--calib", str(text_file), "--samples", "4", "--seq-len", "32", "--no-eval"])
    assert code == 0
    code = main(["generate", str(out), "--prompt", "The quick brown fox", "--max-new-tokens", "5", "--fast"])
    stdout = capsys.readouterr().out
    assert code == 0 and "5 new tokens after a" in stdout and "fast path" in stdout
