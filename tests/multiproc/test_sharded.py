"""FSDP2 and DeepSpeed ZeRO on 2 ranks (torchrun, gloo, tiny Llama) against DDP.

Each group of runs shares one torchrun (tests/multiproc/sft_many.py): the imports and the process
group are set up once, every run is a full Trainer from its own command line.
"""

import json
import sys

import pytest
import torch

from tests.helpers import REPO, arithmetic_rows, free_port, losses, metrics, run_cmd, write_jsonl

pytestmark = pytest.mark.slow

SHARDED = ["fsdp", "fsdp-offload", "zero2", "zero2-offload", "zero3", "zero3-offload"]
DRIVER = str(REPO / "tests" / "multiproc" / "sft_many.py")


def run_group(root, train_type: str, precision: str, steps: int, strategies: list[str], *extra: str,
              nproc: int = 2, data=None) -> dict:
    """Train each strategy on the same data, seed and global batch (2 ranks x 2 x accumulation 2).
    `data`: the dataset file of an earlier group (a resume refuses another path), else a new one."""
    root.mkdir(parents=True, exist_ok=True)
    data = data or write_jsonl(root / "data.jsonl", arithmetic_rows(32))
    runs = [["--model", "tiny-llama", "--dataset", str(data), "--train-type", train_type, "--precision", precision,
             "--max-steps", str(steps), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
             "--strategy", name, "--output-dir", str(root / name), *(a.format(strategy=name) for a in extra)]
            for name in strategies]
    (root / "runs.json").write_text(json.dumps(runs))
    run_cmd([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
             DRIVER, str(root / "runs.json")], cwd=str(REPO))
    return {name: root / name for name in strategies}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """fp32, 10 steps: the strategies should differ from DDP only by the order of float sums."""
    return {t: run_group(tmp_path_factory.mktemp(t), t, "fp32", 10, ["ddp", *SHARDED]) for t in ("full", "lora")}


@pytest.mark.parametrize("train_type", ["full", "lora"])
@pytest.mark.parametrize("strategy", SHARDED)
def test_loss_matches_ddp(parity, train_type, strategy):
    ddp, other = losses(parity[train_type]["ddp"]), losses(parity[train_type][strategy])
    assert len(ddp) == len(other) == 10 and ddp[-1] < ddp[0]
    # Same samples, same seeds (LoRA init, dropout), same AdamW and clipping: what differs is how
    # gradients are summed (reduce-scatter of flat buckets vs all-reduce) and the grad-norm
    # reduction. That is fp32 round-off, ~1e-7 relative; measured <= 1e-7 over 10 steps with
    # gradient accumulation. 1e-6 leaves room, and is far below any real bug (wrong scaling,
    # a missed reduction, a skipped accumulation step: >= 1e-3).
    for a, b in zip(ddp, other):
        assert b == pytest.approx(a, rel=1e-6), (ddp, other)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    # With gradient checkpointing (peft's, for k-bit models) as QLoRA is usually run.
    return run_group(tmp_path_factory.mktemp("qlora"), "qlora", "bf16", 10,
                     ["ddp", "fsdp", "zero2", "zero3", "zero3-offload"], "--gradient-checkpointing")


def reload_logits(run_dir) -> torch.Tensor:
    """The saved peft adapter on a freshly quantized base, on the probe batch the driver used."""
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swiftdist.config import RunConfig
    from swiftdist.data import build_datasets, collate
    from swiftdist.model import load_tokenizer, qlora_config, resolve_model_path

    path = resolve_model_path("tiny-llama")
    # The attention the run resolved `auto` to (eager for these short rows on CPU): the same kernels.
    attn = OmegaConf.load(run_dir / "config.yaml").model.attn_impl
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=qlora_config(torch.bfloat16),
                                                attn_implementation=attn)
    model = PeftModel.from_pretrained(base, run_dir / "final").eval()
    for module in model.modules():  # the 4-bit kernel the training used (see swiftdist/model.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    cfg = RunConfig()
    cfg.data.dataset = [str(run_dir.parent / "data.jsonl")]
    tokenizer = load_tokenizer(path)
    data = build_datasets(tokenizer, cfg.data, cfg.train.seed)
    batch = collate([data.train[i] for i in range(2)], tokenizer.pad_token_id, False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3", "zero3-offload"])
def test_qlora_trains_and_its_adapter_reloads_with_equal_logits(qlora, strategy):
    run = qlora[strategy]
    curve = losses(run)
    assert len(curve) == 10 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.05, curve
    # The frozen norms, embeddings and head are bf16 everywhere (swiftdist/model.py), so the residual
    # stream is bf16 and one rounding in another place moves a loss by ~1e-5: measured from step 2 on,
    # DeepSpeed up to 2.2e-5 relative from DDP (bit-equal while peft upcast them to fp32; which op
    # rounds differently was not pinned down). 2e-4 is the bound FSDP was already held to.
    assert curve == pytest.approx(losses(qlora["ddp"]), rel=2e-4)
    assert json.loads((run / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    trained = torch.load(run / "probe_logits.pt")
    # Same 4-bit weights (quantisation is deterministic), the same adapter values, the same kernels.
    torch.testing.assert_close(reload_logits(run), trained, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def bf16_full(tmp_path_factory):
    """Full fine-tuning in bf16 (with gradient checkpointing, which must not change what is held or
    learned), 4 steps, every strategy: the run dirs."""
    return run_group(tmp_path_factory.mktemp("held"), "full", "bf16", 4,
                     ["ddp", "fsdp", "zero2", "zero3", "fsdp-offload", "zero2-offload", "zero3-offload"],
                     "--gradient-checkpointing")


@pytest.fixture(scope="module")
def held(bf16_full):
    """What each rank holds after the first step, from metrics.jsonl."""
    out = {}
    for name, run in bf16_full.items():
        record = next(r for r in metrics(run) if any(k.startswith("params_mib") for k in r))
        out[name] = {k: v * 2**20 for k, v in record.items() if "_mib_" in k}
    return out


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "zero3-offload"])
def test_deepspeed_bf16_full_fine_tuning_learns_like_ddp(bf16_full, strategy):
    """DeepSpeed's bf16 runs torch autocast over fp32 weights, as DDP does, with gradients accumulated
    and reduced in fp32. (Its own bf16 mode, bf16 weights and a pure-bf16 forward, measured 9.9e-5
    from DDP's loss at step 2 and 2.3e-3 in the weights after these 4 steps: both fail below.)"""
    from safetensors.torch import load_file

    ddp, other = losses(bf16_full["ddp"]), losses(bf16_full[strategy])
    assert len(ddp) == len(other) == 4
    # The forward is the same computation, so what differs is only the order of fp32 gradient sums
    # (reduce-scatter of buckets vs DDP's all-reduce): measured 0 at steps 1-2, then <= 6.7e-6.
    for a, b in zip(ddp, other):
        assert b == pytest.approx(a, rel=5e-5), (ddp, other)

    def weights(run):
        return {k: v for f in sorted((run / "final").glob("*.safetensors")) for k, v in load_file(f).items()}

    ddp_w, other_w = weights(bf16_full["ddp"]), weights(bf16_full[strategy])
    assert ddp_w.keys() == other_w.keys() and all(v.dtype == torch.float32 for v in other_w.values())
    # Adam moves a weight by up to ~lr (1e-3) a step; a summation-order difference can change the
    # update of a weight whose gradient is near zero by a fraction of that: measured 3.2e-5.
    assert max((ddp_w[k] - other_w[k]).abs().max().item() for k in ddp_w) < 5e-4


def _total(held_bytes: dict) -> float:
    return sum(v for k, v in held_bytes.items() if k.startswith(("params_", "optimizer_")))


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharding_really_shards(held, strategy):
    # DDP: fp32 weights (4 B) + Adam moments (8 B) per parameter on every rank. FSDP: half of both
    # (0.50x). ZeRO-3: half of the fp32 weights, of an fp32 master copy and of the moments: 0.67x.
    assert _total(held[strategy]) <= {"fsdp": 0.51, "zero3": 0.68}[strategy] * _total(held["ddp"])


def test_offload_keeps_optimizer_state_off_the_compute_device(held):
    compute = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("fsdp-offload", "zero2-offload", "zero3-offload"):
        devices = {k.rsplit("_", 1)[1] for k in held[name] if k.startswith("optimizer_")}
        assert devices == {"cpu"}, (name, held[name])
    if compute == "cuda":  # on a CPU host the compute device *is* the host: nothing to tell apart
        assert {k.rsplit("_", 1)[1] for k in held["zero3"] if k.startswith("optimizer_")} == {"cuda"}
        assert not any(k.endswith("_cuda") and k.startswith("params_") for k in held["fsdp-offload"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3", "zero2-offload", "fsdp-offload", "zero3-offload"])
def test_estimate_matches_the_state_each_rank_holds(held, strategy):
    from swiftdist.config import ModelConfig
    from swiftdist.memory import estimate, model_stats

    stats = model_stats("tiny-llama", ModelConfig(train_type="full"), "bf16", 64, 2)
    parts, unloaded = estimate(stats, strategy, 2), estimate(stats, strategy.removesuffix("-offload"), 2)
    # Measured after the step: weights, master weights and moments, wherever they live; gradients
    # have been freed (offloaded ones included), so they are left out of the prediction.
    predicted = parts["params"] + parts["optimizer"] + (parts["host"] - unloaded["grads"] if parts["host"] else 0)
    measured = _total(held[strategy])
    # Exact but for FSDP's padding of uneven shards and ZeRO-3's unpartitioned small tensors.
    assert measured == pytest.approx(predicted, rel=0.02), (parts, held[strategy])


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """2 ranks save at step 2; 1 rank resumes with the same global batch. Same-world-size resume is
    in test_resume.py."""
    root = tmp_path_factory.mktemp("reshard")
    runs = run_group(root, "full", "fp32", 4, ["zero2", "zero3"], "--save-steps", "2")
    resumed = run_group(root / "one", "full", "fp32", 4, ["zero2", "zero3"], "--batch-size", "4",
                        "--resume", str(root / "{strategy}" / "checkpoints" / "step-000002"), nproc=1,
                        data=root / "data.jsonl")
    return runs, resumed


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_resumes_on_another_world_size(resharded, strategy):
    runs, resumed = resharded
    # Through DeepSpeed's universal checkpoint, converted on load and kept beside the original.
    assert (runs[strategy] / "checkpoints" / "step-000002" / "model" / "zero_universal").is_dir()
    # fp32 master weights and Adam moments come back exactly; the single rank sums each step's
    # gradients in another order: fp32 round-off (measured 2e-7).
    assert losses(resumed[strategy]) == pytest.approx(losses(runs[strategy])[2:], rel=1e-5)


def test_a_user_deepspeed_config_with_its_own_optimizer_trains(tmp_path):
    """--deepspeed-config end to end: "auto" values filled from our flags, and an "optimizer" section
    (DeepSpeed then builds the optimizer itself; the trainer still sets its learning rate)."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 10000},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.0}},
    }))
    run = run_group(tmp_path, "lora", "bf16", 4, ["zero2"], "--deepspeed-config", str(config))["zero2"]
    curve = losses(run)
    assert len(curve) == 4 and curve[-1] < curve[0]
