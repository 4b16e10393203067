import json
from dataclasses import fields
from pathlib import Path

import pytest

from swiftdist import aliases
from swiftdist.config import RunConfig, field_docs, help_text, parse_config
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
    (["--lora-rank", "eight"], "model.lora_rank must be an integer, got 'eight'"),
    (["--train-type", "half"], "model.train_type='half' must be one of full, lora, qlora"),
    (["--batch-size", "0"], "train.batch_size=0 must be >= 1"),
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


# ---- HF Trainer / ms-swift / TRL aliases ----------------------------------------------------------


def test_hf_trainer_command_line_means_the_same():
    cfg = parse_config("--model_name_or_path tiny-llama --learning_rate 2e-5 --num_train_epochs 3 "
                       "--per_device_train_batch_size 8 --gradient_accumulation_steps 2 --lr_scheduler_type linear "
                       "--warmup_ratio 0.03 --weight_decay 0.0 --max_grad_norm 0.5 --adam_beta2 0.999 --bf16 "
                       "--gradient_checkpointing --output_dir out --save_steps 500 --save_total_limit 3 "
                       "--logging_steps 10 --seed 7 --max_steps -1 --report_to none "
                       "--resume_from_checkpoint out/checkpoints/step-10".split())
    assert (cfg.model.model, cfg.train.lr, cfg.train.epochs) == ("tiny-llama", pytest.approx(2e-5), 3)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.scheduler) == (8, 2, "linear")
    assert (cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.train.max_grad_norm) == (0.03, 0.0, 0.5)
    assert (cfg.train.adam_beta2, cfg.train.precision, cfg.model.gradient_checkpointing) == (0.999, "bf16", True)
    assert (cfg.checkpoint.output_dir, cfg.checkpoint.save_steps, cfg.checkpoint.save_total_limit) == ("out", 500, 3)
    assert (cfg.log.log_steps, cfg.train.seed, cfg.log.report_to) == (10, 7, ["jsonl"])
    assert cfg.checkpoint.resume == "out/checkpoints/step-10"


def test_ms_swift_command_line_means_the_same():
    # The shape of ms-swift's README example (swift sft ...), minus what swiftdist refuses.
    cfg = parse_config(["--model", "tiny-qwen2", "--tuner_type", "lora", "--dataset", "a.jsonl#500", "b.jsonl",
                        "--torch_dtype", "bfloat16", "--num_train_epochs", "1", "--per_device_train_batch_size", "1",
                        "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32", "--target_modules",
                        "all-linear", "--gradient_accumulation_steps", "16", "--eval_steps", "50", "--max_length",
                        "2048", "--split_dataset_ratio", "0.01", "--system", "You are a helpful assistant.",
                        "--model_author", "swift", "--model_name", "swift-robot", "--deepspeed", "zero3_offload",
                        "--attn_impl", "flash_attn", "--truncation_strategy", "delete", "--packing", "true"])
    assert cfg.model.train_type == "lora" and cfg.data.dataset == ["a.jsonl#500", "b.jsonl"]
    assert cfg.model.torch_dtype == "bfloat16" and cfg.data.max_length == 2048 and cfg.data.val_split == 0.01
    assert cfg.data.system == "You are a helpful assistant." and cfg.data.model_name == "swift-robot"
    assert cfg.parallel.strategy == "zero3-offload" and cfg.model.attn_impl == "flash_attention_2"
    assert cfg.data.truncation == "drop" and cfg.data.packing is True and cfg.train.eval_steps == 50


@pytest.mark.parametrize("argv, field, expected", [
    (["--lr_scheduler_type", "cosine"], "train.scheduler", "cosine"),
    (["--lr_scheduler_type", "constant_with_warmup"], "train.scheduler", "constant"),
    (["--lr_scheduler_type", "constant"], "train.warmup_ratio", 0.0),  # HF's constant has no warmup
    (["--warmup_steps", "0.1"], "train.warmup_ratio", 0.1),  # transformers 5: a float < 1 is a fraction
    (["--bf16", "false"], "train.precision", "fp32"),
    (["--fp16", "false"], "train.precision", "auto"),
    (["--deepspeed", "zero2"], "parallel.strategy", "zero2"),
    (["--deepspeed", "zero2_offload"], "parallel.strategy", "zero2-offload"),
    (["--fsdp", "full_shard auto_wrap"], "parallel.strategy", "fsdp"),
    (["--fsdp", "full_shard auto_wrap offload"], "parallel.strategy", "fsdp-offload"),
    (["--fsdp", "fsdp2"], "parallel.strategy", "fsdp"),
    (["--num_train_epochs", "2.0"], "train.epochs", 2),
    (["--report_to", "wandb"], "log.report_to", ["wandb"]),
    (["--use_peft", "false"], "model.train_type", "full"),
    (["--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"], "model.target_modules", ["q_proj", "v_proj"]),
    (["--max_seq_length", "256"], "data.max_length", 256),
    (["--truncation_strategy", "right"], "data.truncation", "truncate"),
    (["--attn_implementation", "sdpa"], "model.attn_impl", "sdpa"),
])
def test_alias_values_map_to_ours(argv, field, expected):
    section, key = field.split(".")
    assert getattr(getattr(parse_config(argv), section), key) == expected


@pytest.mark.parametrize("argv, reason", [
    (["--num_train_epochs", "2.5"], "--num_train_epochs 2.5: swiftdist runs whole epochs; use --max-steps"),
    (["--lr_scheduler_type", "polynomial"], "--lr_scheduler_type polynomial: no such schedule here; swiftdist has "
                                            "linear, cosine, constant_with_warmup, constant"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "use --scheduler cosine --min-lr-ratio R"),
    (["--fp16", "true"], "--fp16 true: swiftdist has no fp16 path"),
    (["--fp16"], "--fp16 true: swiftdist has no fp16 path"),
    (["--bf16", "maybe"], "--bf16 maybe: expected true or false"),
    (["--warmup_steps", "100"], "--warmup_steps 100: swiftdist sets warmup as a fraction of the run"),
    (["--deepspeed", "zero1"], "--deepspeed zero1: ZeRO stages 0 and 1 are not offered"),
    (["--deepspeed", "missing.json"], "--deepspeed missing.json: not one of zero2, zero3, zero2_offload, "
                                      "zero3_offload, nor an existing JSON file"),
    (["--deepspeed", '{"zero_optimization": {"stage": 3}}'], "save it to a JSON file"),
    (["--fsdp", "shard_grad_op auto_wrap"], "no shard_grad_op, hybrid_shard or JSON"),
    (["--truncation_strategy", "left"], "--truncation_strategy left: swiftdist truncates on the right"),
    (["--per_device_eval_batch_size", "2"], "evaluation runs at --batch-size"),
    (["--quant_bits", "4"], "use --train-type qlora"),
    (["--load_in_4bit"], "use --train-type qlora"),
    (["--torch_dtype", "float16"], "model.torch_dtype='float16' must be one of auto, bfloat16, float32"),
    (["--report_to", "tensorboard"], "log.report_to: unknown sink 'tensorboard' (jsonl, wandb)"),
])
def test_alias_with_another_meaning_is_refused_with_the_reason(argv, reason):
    with pytest.raises(SwiftdistError) as e:
        parse_config(argv)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_learning_rate_is_no_longer_a_typo():
    assert parse_config(["--learning_rate", "1e-4"]).train.lr == pytest.approx(1e-4)
    with pytest.raises(SwiftdistError, match=r"'--learning_rat'; did you mean --learning_rate\?"):
        parse_config(["--learning_rat", "1e-4"])


@pytest.mark.parametrize("zero, strategy", [
    ({"stage": 2}, "zero2"),
    ({"stage": 3}, "zero3"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}, "zero3-offload"),
    ({"stage": 2, "offload_optimizer": {"device": "none"}}, "zero2"),
])
def test_deepspeed_json_path_picks_the_strategy_of_its_stage(tmp_path, zero, strategy):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero}))
    cfg = parse_config(["--deepspeed", str(path)])
    assert (cfg.parallel.strategy, cfg.parallel.deepspeed_config) == (strategy, str(path))


def test_deepspeed_json_of_stage_1_or_broken_is_refused(tmp_path):
    stage1 = tmp_path / "z1.json"
    stage1.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(SwiftdistError, match="it asks for ZeRO stage 1; swiftdist runs stage 2 or 3"):
        parse_config(["--deepspeed", str(stage1)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SwiftdistError, match=f"--deepspeed {broken}: cannot read it as a DeepSpeed JSON object"):
        parse_config(["--deepspeed", str(broken)])


def test_aliases_work_in_yaml_presets(tmp_path):
    preset = tmp_path / "swift.yaml"
    preset.write_text("learning_rate: 2.0e-4\nnum_train_epochs: 3\ndeepspeed: zero2\nbf16: true\n"
                      "per_device_train_batch_size: 2\nreport_to: none\ndataset: a.jsonl\n")
    cfg = parse_config(["--config", str(preset)])
    assert (cfg.train.lr, cfg.train.epochs, cfg.parallel.strategy) == (pytest.approx(2e-4), 3, "zero2")
    assert (cfg.train.precision, cfg.train.batch_size, cfg.log.report_to) == ("bf16", 2, ["jsonl"])
    assert cfg.data.dataset == ["a.jsonl"]  # a single value for a list
    refused = tmp_path / "fp16.yaml"
    refused.write_text("fp16: true\n")
    with pytest.raises(SwiftdistError, match=r"fp16.yaml: fp16: True: swiftdist has no fp16 path"):
        parse_config(["--config", str(refused)])


def test_readme_alias_table_is_generated_from_the_code():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("<!-- aliases:start -->\n")[1].split("<!-- aliases:end -->")[0]
    assert table == aliases.markdown_table(), "regenerate the README table with swiftdist.aliases.markdown_table()"


# ---- --help ---------------------------------------------------------------------------------------


def test_help_shows_each_option_with_its_description_default_choices_and_aliases(capsys):
    from swiftdist.cli import main

    assert main(["sft", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrap the lines
    for section in fields(RunConfig):
        for leaf in fields(section.default_factory()):
            doc = field_docs(type(section.default_factory())).get(leaf.name)
            assert doc, f"{section.name}.{leaf.name} has no docstring"
            assert f"--{leaf.name.replace('_', '-')}" in text and doc in text
    assert "--train-type {full,lora,qlora}" in text
    assert "(default: lora; choices: full, lora, qlora; also: --tuner_type, --use_peft)" in text
    assert "(default: 0.0001; also: --learning_rate)" in text


def test_help_without_shipped_sources_still_lists_defaults(monkeypatch):
    import inspect

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    assert field_docs(RunConfig) == {}
    assert "--lora-rank INT\n      (default: 8; also: --lora_r)" in help_text()


# ---- config error paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("model:\n  lora_rank: 4\n bad: [\n", ":3: not valid YAML (did not find expected key)"),
    ("- lora_rank\n- 4\n", ": expected a mapping of config keys (`key: value` lines), got a list"),
    ("data: x\n", ": 'data' is a section; put its keys under it, indented"),
    ("train:\n  lora_rank: 3\n", ": unknown config key 'train.lora_rank': lora_rank belongs in section 'model' "
                                 "(model.lora_rank)"),
    ("lora_rank: eight\n", ": model.lora_rank must be an integer, got 'eight'"),
    ("lora_rank: [1]\n", ": model.lora_rank must be an integer, got [1]"),
    ("packing: maybe\n", ": data.packing must be true or false, got 'maybe'"),
    ("model: null\n", ": model.model must be a value (not null), got None"),
    ("datset: [a.jsonl]\n", ": unknown config key 'datset'; did you mean dataset?"),
])
def test_yaml_errors_name_the_file_and_say_what_is_wrong(tmp_path, text, expected):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(SwiftdistError) as e:
        parse_config(["--config", str(preset)])
    assert f"{preset}{expected}" in str(e.value) and "\n" not in str(e.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(SwiftdistError, match="a directory, not a YAML file"):
        parse_config(["--config", str(tmp_path)])


@pytest.mark.parametrize("argv, expected", [
    (["--log-steps", "0"], "log.log_steps=0 must be >= 1"),
    (["--warmup-ratio", "1"], "train.warmup_ratio=1.0 must be in [0, 1)"),
    (["--lora-dropout", "1.5"], "model.lora_dropout=1.5 must be in [0, 1)"),
    (["--save-steps", "0.5"], "checkpoint.save_steps must be an integer, got '0.5'"),
    (["--strategy", "zero4"], "parallel.strategy='zero4' must be one of ddp"),
    (["--lr", "1", "2"], "--lr takes one value, got 2: 1 2"),
])
def test_range_and_type_errors_name_the_key(argv, expected):
    with pytest.raises(SwiftdistError) as e:
        parse_config(argv)
    assert expected in str(e.value)


def test_a_value_containing_equals_is_a_value():
    assert parse_config(["--system", "x = y", "train.lr=0.5"]).data.system == "x = y"
