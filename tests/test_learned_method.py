"""A new learned method is its own package and nothing else: a toy method, written into a temporary package from
the shared run layer alone (spectral layer, trainer, run folder, cut), compresses through the CLI and through
`compress()`, keeps and resumes its run folder, and `soco export` re-cuts its finished run at another ratio.
Also: no module of the CLI names a method or reaches into one."""

import ast
import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest

import soco_llm
from clirun import assert_one_line_error, run
from soco_llm.methods import base
from tiny import random_windows, tiny_model

TOY = '''
"""A toy learned method: the plain basis of every target, its scores trained a few steps by KL to the dense
model in the shared trainer, then the shared global cut."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from soco_llm.core.adapter import linear_weight
from soco_llm.core.decompose import plain_basis
from soco_llm.core.teacher import kl_batch_loss, teacher_cache
from soco_llm.core.trainer import Run, train
from soco_llm.learned import run_folder
from soco_llm.learned.config import LearnedConfig
from soco_llm.learned.cut import cut
from soco_llm.learned.spectral import GateState, install_spectral
from soco_llm.methods import MethodResult, register


@dataclass
class ToyConfig(LearnedConfig):
    method: ClassVar[str] = "toy"
    cli_options: ClassVar[dict] = {**LearnedConfig.cli_options, "toy_steps": "the toy method's training steps"}
    toy_steps: int = 3
    deviation: bool = False

    @property
    def needs(self):
        return frozenset({"windows"})


def compress_toy(model, cfg, targets, windows, _calibration):
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    run_dir, cached = run_folder.prepare(cfg, getattr(model, "name_or_path", None) or None, dtype)
    if cached:
        teacher, basis = run_folder.load_teacher(run_dir), run_folder.load_basis(run_dir)
    else:
        teacher = teacher_cache(model, windows, cfg.teacher_topk, 4)
        basis = {}
        for t in targets:
            spec = plain_basis(linear_weight(t.module).detach(), t.name)
            basis[t.name] = {"left": spec.left.to(dtype), "sigma": spec.sigma.to(dtype), "right": spec.right.to(dtype),
                             "prior": (spec.sigma / spec.sigma.mean()).float()}
        run_folder.save_cache(run_dir, basis, teacher)
    layers = install_spectral(model, targets, basis, GateState())
    params = {f"{n}.scores": l.scores.requires_grad_(True) for n, l in layers.items()}
    loss = kl_batch_loss(model, windows, teacher, 4)

    def step(i, gen):
        kl = loss(gen, 0, 1)
        return kl, {"kl": kl}

    history = train(params, torch.optim.Adam(list(params.values()), lr=1e-2), step,
                    Run(cfg.toy_steps, cfg.seed, cfg.checkpoint_every, run_dir, cfg.resume, desc="toy",
                        label=f"run folder {run_dir}"))
    final = run_folder.trained_tensors(layers)
    run_folder.save_tensors(run_dir, run_folder.SCORES_FILE, final)
    rows = cut(model, layers, cfg.ratio, cfg.deviation, cfg.rank_multiple)
    run_folder.finish(run_dir)
    return MethodResult(rows, cfg.record(cfg.ratio, history, run_dir), {run_folder.SCORES_FILE: final}, teacher)


register(ToyConfig, compress_toy)
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy package, written and imported; the registry is put back afterwards."""
    package = tmp_path / "pkgs" / "toy_learned"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setattr(base, "METHODS", dict(base.METHODS))
    monkeypatch.setattr(base, "_HANDLERS", dict(base._HANDLERS))
    for module in ("soco_llm.methods", "soco_llm.commands", "soco_llm.cli", "soco_llm.learned.recut"):
        monkeypatch.setattr(sys.modules[module], "METHODS", base.METHODS, raising=False)
    monkeypatch.delitem(sys.modules, "toy_learned", raising=False)
    return importlib.import_module("toy_learned")


def test_a_toy_learned_method_needs_nothing_outside_its_package(toy, capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "toy"
    argv = ["compress", "--method", "toy", "--ratio", "0.4", "--model", model_dir, "--out", out, "--calib", text_file,
            "--samples", "8", "--seq-len", "32", "--no-eval", "--toy-steps", "4", "--set", "checkpoint_every=2"]
    code, _, err = run(capsys, *argv)  # its option comes from its config's cli_options
    assert code == 0, err
    comp = json.loads((out / "config.json").read_text())["compression"]
    assert comp["method"] == "toy" and comp["config"]["toy_steps"] == 4
    run_dir = tmp_path / "toy.run"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
    assert json.loads((run_dir / "checkpoint.json").read_text())["step"] == 4  # the shared trainer's checkpoint

    code, _, err = run(capsys, *argv)  # the shared run-folder rules: a finished run is not trained over
    assert_one_line_error(code, err, "already holds a finished run")
    code, _, err = run(capsys, *argv, "--overwrite", "--resume")  # saved again from the finished run
    assert code == 0, err

    code, _, err = run(capsys, "export", "--from", run_dir, "--ratio", "0.6", "--out", tmp_path / "toy-0.6", "--no-eval")
    assert code == 0, err  # the shared re-cut
    recut = json.loads((tmp_path / "toy-0.6" / "config.json").read_text())["compression"]
    assert recut["method"] == "toy" and sum(recut["ranks"].values()) < sum(comp["ranks"].values())

    # compress() runs the same recipe (the toy has no healing), and the model works
    model = tiny_model("llama")
    report = soco_llm.compress(model, toy.ToyConfig(ratio=0.4, toy_steps=2), random_windows(8, 32))
    assert report.method == "toy" and "heal" not in report.config
    assert model(input_ids=random_windows(2, 16)).logits.isfinite().all()


def test_the_cli_names_no_method_and_reaches_into_none():
    package = Path(soco_llm.__file__).parent
    for name in ("cli.py", "commands.py", "command_stages.py"):
        tree = ast.parse((package / name).read_text())
        imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not [m for m in imported if m.startswith("methods.") and m != "methods.base"], (name, imported)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not {cls.__name__ for cls in base.METHODS.values()} & names, name


def test_run_folders_of_the_old_trainers_are_refused_in_one_line(capsys, model_dir, text_file, tmp_path):
    """OUT.heal and OUT.run checkpoints written before the one trainer: one line, nothing loaded or written."""
    heal_dir = tmp_path / "o.heal"
    heal_dir.mkdir()
    (heal_dir / "heal_checkpoint.json").write_text(json.dumps({"step": 2, "history": [], "mode": "factors"}))
    code, _, err = run(capsys, "compress", "--method", "svd", "--ratio", "0.4", "--model", model_dir, "--out",
                       tmp_path / "o", "--calib", text_file, "--heal-steps", "4", "--resume")
    assert_one_line_error(code, err, "older soco-llm")
    run_dir = tmp_path / "s.run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"config": {"method": "soco"}, "status": "running"}))
    (run_dir / "checkpoint.json").write_text(json.dumps({"step": 2, "history": []}))  # no format: SoCo's old one
    code, _, err = run(capsys, "compress", "--method", "soco", "--ratio", "0.4", "--model", model_dir, "--out",
                       tmp_path / "s", "--calib", text_file, "--quick")
    assert_one_line_error(code, err, "older soco-llm")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
