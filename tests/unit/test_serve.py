"""`swiftdist serve` without a server: which backend runs, how adapters are named, refusals before loading."""

import importlib.util
import json

import pytest
import torch

from swiftdist import serve
from swiftdist.cli import main as cli_main
from swiftdist.errors import SwiftdistError


def machine(monkeypatch, vllm: bool, gpu: bool):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" and vllm else
                        (None if name == "vllm" else real(name, *a)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)


def test_auto_takes_vllm_only_with_the_package_and_a_gpu(monkeypatch):
    machine(monkeypatch, vllm=True, gpu=True)
    assert serve.choose_backend("auto")[0] == "vllm"
    assert serve.choose_backend("transformers")[0] == "transformers"
    machine(monkeypatch, vllm=True, gpu=False)
    assert serve.choose_backend("auto") == ("transformers", "vllm not used: no CUDA GPU")
    machine(monkeypatch, vllm=False, gpu=True)
    assert serve.choose_backend("auto") == ("transformers", "vllm not used: no vllm package")


def test_asking_for_vllm_where_it_cannot_run_is_a_one_line_error(monkeypatch):
    machine(monkeypatch, vllm=False, gpu=False)
    with pytest.raises(SwiftdistError, match="--backend vllm needs the vllm package and a CUDA GPU"):
        serve.choose_backend("vllm")
    machine(monkeypatch, vllm=True, gpu=False)
    with pytest.raises(SwiftdistError, match="needs a CUDA GPU, which this machine lacks"):
        serve.choose_backend("vllm")


def adapter_dir(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return path


def test_adapter_names(tmp_path):
    run = adapter_dir(tmp_path / "identity-run" / "final")
    other = adapter_dir(tmp_path / "style")
    # A run's OUTPUT/final is named after the run; other dirs after themselves; NAME=DIR names it.
    assert serve.adapter_names([str(run), str(other), f"mine={other}"]) == {
        "identity-run": run, "style": other, "mine": other}
    with pytest.raises(SwiftdistError, match="the name 'style' is taken"):
        serve.adapter_names([str(other), str(other)])
    with pytest.raises(SwiftdistError, match="no adapter_config.json"):
        serve.adapter_names([str(tmp_path)])


def test_refusals_come_before_any_model_loads(tmp_path, capsys):
    assert cli_main(["serve", "--model", "tiny-llama", "--adapter", str(tmp_path)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    named = adapter_dir(tmp_path / "tiny-llama")
    assert cli_main(["serve", "--model", "tiny-llama", "--adapter", str(named)]) == 2
    assert "the name is the base model's" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["serve", "--model", "tiny-llama", "--backend", "vllm"]) == 2
        assert "--backend vllm needs" in capsys.readouterr().err
