"""--strategy fsdp builds on the meta device and each rank reads only its shards from the safetensors
files (swiftdist/sharded_load.py): on 2 ranks, what it builds must equal the eager load exactly, base
weights, LoRA's random init, buffers and the random generator's state after it; and a model whose
files it cannot read that way loads whole, equal too. (Training parity with DDP:
tests/multiproc/test_sharded.py.)"""

import json
import sys

import pytest

from tests.helpers import REPO, free_port, run_cmd

pytestmark = pytest.mark.slow


def odd_model(tiny_llama, out):
    """An untied Llama, in several files, whose tensors have odd lengths (norms of 65, MLP 75 x 65): FSDP's
    row shards are uneven, and ZeRO-3's second partition ends in padding and starts inside a row."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama, hidden_size=65, num_attention_heads=5, num_key_value_heads=1,
                                        head_dim=16, intermediate_size=75, tie_word_embeddings=False)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="2MB")
    assert (out / "model.safetensors.index.json").exists()
    return out


def renamed_model(tiny_llama, out):
    """tiny-llama with its final norm stored under a name the model does not use."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    (out / "config.json").write_text((tiny_llama / "config.json").read_text())
    tensors = load_file(tiny_llama / "model.safetensors")
    tensors["model.final_norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def check_load_cases(strategy: str, tiny_llama, tiny_qwen2, tmp_path, missing) -> list[list[str]]:
    """Build the same six models under `strategy` (and its -offload twin for one) on 2 ranks with
    sharded_load_driver.py and check each equals the eager load; `missing(name)` is what the strategy's
    full state dict leaves out. Returns the gloo threads each rank still ran after closing every
    strategy and destroying the process groups."""
    def case(name, model, train_type, precision, offload=False):
        return {"name": name, "model": str(model), "strategy": strategy + ("-offload" if offload else ""),
                "train_type": train_type, "precision": precision}

    cases = [case("llama-tied-lora-bf16", tiny_llama, "lora", "bf16"),
             case("llama-tied-full-fp32", tiny_llama, "full", "fp32"),
             case("qwen2-lora-fp32-offload", tiny_qwen2, "lora", "fp32", offload=True),
             case("qwen2-full-bf16", tiny_qwen2, "full", "bf16"),
             case("odd-full-fp32", odd_model(tiny_llama, tmp_path / "odd"), "full", "fp32"),
             case("renamed-lora-fp32", renamed_model(tiny_llama, tmp_path / "renamed"), "lora", "fp32")]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                    str(REPO / "tests" / "multiproc" / "sharded_load_driver.py"), str(tmp_path / "cases.json"),
                    str(tmp_path / "out.json")], cwd=str(REPO))
    results = json.loads((tmp_path / "out.json").read_text())
    assert sorted(results) == sorted(c["name"] for c in cases)
    for name, r in results.items():
        assert r["sliced"] == (name != "renamed-lora-fp32"), name
        assert r["missing"] == missing(name), (name, r)
        # Exact: the same bytes from the files, cast to the same dtype, and the same random draws.
        assert (r["extra"], r["differ"], r["rng_equal"]) == ([], [], True), (name, r)
        assert r["n_tensors"] > 20
    # The fallback says why, once per rank.
    assert proc.stderr.count("no tensor model.norm.weight in") == 2, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"out.json.threads-rank{r}").read_text()) for r in range(2)]


def test_the_sliced_load_equals_the_eager_load(tiny_llama, tiny_qwen2, tmp_path):
    # (No check of the gloo threads left: after an FSDP2 backward, torch keeps its group alive in C++
    # past destroy_process_group(), with no Python object left holding it; see the zero3 test.)
    check_load_cases("fsdp", tiny_llama, tiny_qwen2, tmp_path, missing=lambda name: [])
