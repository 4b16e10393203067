import pytest

from swiftdist.config import parse_config
from swiftdist.errors import SwiftdistError


def test_defaults():
    cfg = parse_config([])
    assert cfg.model.model == "smollm2"
    assert cfg.model.train_type == "lora"
    assert cfg.parallel.strategy == "ddp"
    assert cfg.model.target_modules == ["all-linear"]


def test_flags_dotlist_and_equals_forms():
    cfg = parse_config(["--lora-rank", "16", "--lr=3e-4", "train.batch_size=2", "--packing", "--dataset", "a.jsonl", "b.jsonl#5"])
    assert cfg.model.lora_rank == 16
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.batch_size == 2
    assert cfg.data.packing is True
    assert cfg.data.dataset == ["a.jsonl", "b.jsonl#5"]


def test_yaml_preset_nested_and_flat_then_cli_wins(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  lora_rank: 4\nlr: 0.01\nstrategy: ddp\n")
    cfg = parse_config(["--config", str(preset), "--lr", "0.02"])
    assert cfg.model.lora_rank == 4
    assert cfg.train.lr == pytest.approx(0.02)


def test_shipped_presets_parse():
    from pathlib import Path

    for preset in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        parse_config(["--config", str(preset)])


@pytest.mark.parametrize("argv, expected", [
    (["--lora-rnak", "8"], "unknown config key '--lora-rnak'; did you mean --lora-rank?"),
    (["model.lora_rnak=8"], "did you mean model.lora_rank?"),
    (["--lora-rank", "eight"], "model.lora_rank='eight'"),
    (["--train-type", "half"], "model.train_type='half' must be one of full, lora, qlora"),
    (["--batch-size", "0"], "train.batch_size must be >= 1"),
    (["--lr"], "--lr needs a value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_errors_are_one_line_and_name_the_key(argv, expected):
    with pytest.raises(SwiftdistError) as e:
        parse_config(argv)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rnak: 3\n")
    with pytest.raises(SwiftdistError, match=r"bad.yaml: unknown config key 'lora_rnak'; did you mean"):
        parse_config(["--config", str(bad)])
    with pytest.raises(SwiftdistError, match="file not found"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_all_problems_reported_at_once():
    with pytest.raises(SwiftdistError) as e:
        parse_config(["--batch-size", "0", "--scheduler", "step"])
    assert "batch_size" in str(e.value) and "scheduler" in str(e.value)
