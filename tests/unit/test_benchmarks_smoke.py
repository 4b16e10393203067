"""Benchmark code that runs without a GPU: the GPU suite's model configs, FLOP count, MFU and gate,
the job spec's flags, and the report writer. The CPU suite end to end: tests/multiproc/test_benchmarks_smoke.py."""

import json

import pytest
import torch

from benchmarks import gpu_suite, report, run
from benchmarks.runner import median_after_warmup
from benchmarks.spec import BenchSpec

# Published sizes of the real models the GPU suite builds (their model cards).
PUBLISHED_PARAMS = {"qwen2.5-0.5b": 0.49e9, "qwen2.5-7b": 7.61e9, "llama3-8b": 8.03e9}


@pytest.mark.parametrize("model", list(gpu_suite.MODELS))
def test_gpu_model_configs_have_the_real_sizes_and_the_flop_count_sees_every_matmul(model):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(gpu_suite.hf_config(model))
    assert sum(p.numel() for p in hf.parameters()) == pytest.approx(PUBLISHED_PARAMS[model], rel=0.01)
    linear = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    assert gpu_suite.Shape.of(hf.config).matmul_params == linear


def test_flops_per_token_and_mfu():
    shape = gpu_suite.Shape.of(gpu_suite.hf_config("llama3-8b"))
    attention = 12 * 32 * 32 * 128 * 2048
    assert gpu_suite.flops_per_token(shape, 2048, "full") == 6 * shape.matmul_params + attention
    assert gpu_suite.flops_per_token(shape, 2048, "qlora") == 4 * shape.matmul_params + attention
    # 1000 tokens/s at 1e12 FLOPs per token on a 2000 TFLOP/s card: half the peak.
    assert gpu_suite.mfu(1000, 1e12, 2000) == pytest.approx(0.5)


def test_peak_flops_table_prefers_the_specific_h100_variant_and_refuses_unknown_cards():
    assert gpu_suite.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert gpu_suite.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_suite.peak_tflops("Some Card", 123.0) == 123.0
    with pytest.raises(SystemExit, match="--peak-tflops"):
        gpu_suite.peak_tflops("Some Card", None)


def test_full_fine_tuning_of_7b_is_skipped_on_an_80gb_card_with_the_reason():
    assert "GiB" in gpu_suite.skip_reason("qwen2.5-7b", "full", 79.0)
    assert gpu_suite.skip_reason("qwen2.5-0.5b", "full", 79.0) is None
    assert gpu_suite.skip_reason("qwen2.5-7b", "qlora", 79.0) is None


def test_gpu_job_packs_enough_rows_with_gradient_checkpointing(tmp_path):
    from swiftdist.config import parse_config

    spec = gpu_suite.job_spec(tmp_path, "qlora", steps=10, seq=2048, gpus=1)
    cfg = parse_config(spec.swiftdist_argv("ddp", 1, str(tmp_path / "out")))
    assert cfg.model.gradient_checkpointing and cfg.data.packing and cfg.data.max_length == 2048
    rows = int(cfg.data.dataset[0].split("#")[1])
    assert rows * 45 >= 10 * 2048  # the shortest self-cognition row has 45 tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gate is for machines without CUDA")
def test_gpu_suite_refuses_without_cuda_and_says_why(tmp_path, capsys):
    assert run.main(["--suite", "gpu", "--out", str(tmp_path)]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


def test_spec_flags_parse_as_swiftdist_config_and_round_trip(tmp_path):
    from swiftdist.config import parse_config

    spec = BenchSpec(model="tiny-llama", steps=3, global_batch=8, precision="bf16", dataset=["self-cognition#24"])
    assert BenchSpec.load(spec.save(tmp_path / "spec.json")) == spec
    cfg = parse_config(spec.swiftdist_argv("fsdp", 2, str(tmp_path)))
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.parallel.strategy) == (4, 3, "fsdp")
    assert (cfg.train.adam_beta2, cfg.train.weight_decay, cfg.model.lora_alpha) == (0.95, 0.1, 32)
    with pytest.raises(ValueError, match="does not split"):
        spec.micro_batch(3)


def test_median_leaves_out_warmup_but_keeps_one_step():
    assert median_after_warmup([9.0, 5.0, 1.0, 2.0, 3.0], warmup=2) == 2.0
    assert median_after_warmup([9.0, 5.0], warmup=2) == 5.0


def test_report_writes_table_and_json(tmp_path):
    rows = [{"contender": "a|b", "step_s": 1.23456, "extra": [1, 2]}, {"contender": "c", "status": "skipped"}]
    md, js = report.write(tmp_path, "T", [("contender", "who"), ("step_s", "s")], rows, ["note"], {"k": 1})
    text = md.read_text()
    assert "| who | s |" in text and "| a\\|b | 1.23 |" in text and "| c | – |" in text and "- note" in text
    assert json.loads(js.read_text())["rows"][0]["extra"] == [1, 2]


def test_ms_swift_gets_the_same_conversations_in_swiftdist_order_and_the_models_system_prompt(tmp_path, tiny_llama):
    from benchmarks import cpu_suite
    from swiftdist.config import DataConfig
    from swiftdist.data import Conversation, StepSampler, build_datasets, tokenize
    from swiftdist.model import load_tokenizer

    spec = BenchSpec(model="tiny-llama", dataset=["self-cognition#16"], precision="bf16")
    tail, why = cpu_suite.ms_swift_inputs(spec, tmp_path, "/env/bin/python")
    assert why == "" and tail[0] == "/env/bin/python" and tail[2] == str(tiny_llama)
    assert tail[3] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    rows = [json.loads(line)["messages"] for line in open(tail[1])]
    # Step k of ms-swift (no shuffling) trains on rows 8k..8k+7: the samples swiftdist's step k draws.
    tok = load_tokenizer(tiny_llama)
    train = build_datasets(tok, DataConfig(dataset=spec.dataset), spec.seed).train
    order = StepSampler(len(train), spec.seed, spec.global_batch, 1, 0, 1).permutation(0)
    for row, i in zip(rows, order, strict=True):
        assert tokenize(tok, Conversation(row, "ms-swift data"))[0] == train[i].input_ids
    assert cpu_suite.ms_swift_inputs(spec, tmp_path, None)[1].startswith("not run: no --ms-swift-python")


def test_activation_memory_goal_needs_ms_swifts_rss_at_most_and_0_8x_its_wall_and_cpu_time():
    from benchmarks.activation_memory import MS_SWIFT, _goal

    peer = {"step_s": 10.0, "ratio": 1.5, "cpu_ratio": 1.5, "peak_rss_gib": 2.0}
    rows = {MS_SWIFT: peer,
            "swiftdist, a": {"step_s": 7.0, "ratio": 1.2, "cpu_ratio": 1.2, "peak_rss_gib": 2.0},  # 0.8x, 1x: met
            "swiftdist, b": {"step_s": 7.0, "ratio": 1.2, "cpu_ratio": 1.35, "peak_rss_gib": 1.9},  # CPU 0.9x
            "swiftdist, c": {"step_s": 7.0, "ratio": 1.0, "cpu_ratio": 1.0, "peak_rss_gib": 2.1}}  # RSS 1.05x
    notes = _goal(rows)
    assert [n.rsplit(": ", 1)[1] for n in notes] == ["met.", "missed.", "missed."]
    assert "0.90x its CPU time" in notes[1] and "1.05x its peak RSS" in notes[2]
    assert _goal({})[0].endswith("not checked, ms-swift did not run.")
