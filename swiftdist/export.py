"""`swiftdist export`: a checkpoint of any strategy -> a plain Hugging Face directory.

    swiftdist export --checkpoint out/checkpoints/latest --to out/merged [--merge-lora] [--dtype bf16]

Memory stays at about one output shard whatever the model size: tensors stream in, are converted
one at a time and go out in safetensors shards (+ index), with the tokenizer and config.
- Full fine-tune: the weights come from the strategy's native shards (DCP, DeepSpeed, ...) through
  `Strategy.load_tensors`, a few at a time.
- LoRA / QLoRA with --merge-lora: the base weights are read shard by shard from the base model and
  the peft adapter the checkpoint holds is added (W + B @ A * alpha / r). The base is first made
  what training saw: cast to the dtype it was loaded in and, for QLoRA, quantised to NF4 and
  dequantised by bitsandbytes exactly as at load time, so the merged model computes what the
  trained one did (QLoRA comes out dequantised).
- LoRA / QLoRA without --merge-lora: the peft adapter, as is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from swiftdist import checkpoint
from swiftdist.errors import SwiftdistError

log = logging.getLogger("swiftdist")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export(ckpt: str, out: str, merge_lora: bool = False, dtype: str = "auto", base_model: str | None = None,
           max_shard_mb: int = 2048) -> Path:
    path = checkpoint.find_complete(ckpt, "--checkpoint")
    state = checkpoint.TrainerState.from_file(path / checkpoint.STATE_FILE)
    lora = state.train_type != "full"
    if merge_lora and not lora:
        raise SwiftdistError(f"--merge-lora: {path} is a full fine-tune; there is no adapter to merge")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise SwiftdistError(f"--to {out}: exists and is not empty; choose a new directory")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora and not merge_lora:
        shutil.copytree(path / "adapter", tmp)
    else:
        base = Path(base_model or state.model)
        if not (base / "config.json").exists():
            raise SwiftdistError(f"base model {base} (from {path / checkpoint.STATE_FILE}) is not a model "
                                 "directory; pass --base-model DIR")
        out_dtype = DTYPES[dtype] or getattr(torch, state.base_dtype)
        tensors = _merged(path, state, base) if lora else _native(path, state, base, max_shard_mb)
        _write_shards(tensors, tmp, out_dtype, max_shard_mb * 2**20)
        _write_config(base, tmp, out_dtype)
    os.replace(tmp, target)
    return target


# ---- where the tensors come from -------------------------------------------------------------


def _base_files(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.exists():
        return [base / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    if (base / "model.safetensors").exists():
        return [base / "model.safetensors"]
    raise SwiftdistError(f"{base}: no safetensors weights (model.safetensors or its index); export reads those")


def _native(path: Path, state, base: Path, max_shard_mb: int) -> Iterator[tuple[str, torch.Tensor]]:
    """A full fine-tune's weights from the strategy's own shards, named and ordered as the base model's files."""
    from swiftdist.strategies import get_strategy_class

    reader = get_strategy_class(state.strategy)
    budget = max_shard_mb * 2**20
    for file in _base_files(base):
        with safe_open(file, "pt") as f:
            names = list(f.keys())
            sizes = {n: f.get_slice(n).get_shape() for n in names}
        chunk, nbytes = [], 0
        for i, name in enumerate(names):
            chunk.append(name)
            nbytes += 4 * torch.Size(sizes[name]).numel()  # trained weights are at most fp32
            if nbytes >= budget or i == len(names) - 1:
                yield from reader.load_tensors(str(path / "model"), chunk).items()
                chunk, nbytes = [], 0


def _merged(path: Path, state, base: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Base weights as training saw them, plus the adapter's delta where it has one."""
    adapter = _LoRA(path / "adapter")
    load_dtype = getattr(torch, state.base_dtype)
    quantized = _quantized_weights(base, load_dtype) if state.train_type == "qlora" else set()
    for file in _base_files(base):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                w = f.get_tensor(name).to(load_dtype)
                if name in quantized:
                    w = _nf4_roundtrip(w, load_dtype)
                yield name, adapter.merge(name, w)
    adapter.check_all_used()


class _LoRA:
    """A peft adapter's A/B pairs (small); each delta is computed when its base weight streams by."""

    def __init__(self, directory: Path):
        from safetensors.torch import load_file

        config = json.loads((directory / "adapter_config.json").read_text())
        unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
                       if config.get(k)]
        if unsupported:
            raise SwiftdistError(f"{directory}: cannot merge an adapter with {', '.join(unsupported)} set")
        r = config["r"]
        self.scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
        weights = load_file(directory / "adapter_model.safetensors")
        # peft names a pair base_model.model.<module>.lora_{A,B}.weight; the base weight is <module>.weight.
        self.pairs = {}
        for key in weights:
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                self.pairs[f"{module}.weight"] = (weights[key], weights[key.replace(".lora_A.", ".lora_B.")])
        self.used = set()

    def merge(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in self.pairs:
            return w
        a, b = self.pairs[name]
        self.used.add(name)
        return w.float() + (b.float() @ a.float()) * self.scale

    def check_all_used(self) -> None:
        unused = sorted(set(self.pairs) - self.used)
        if unused:
            raise SwiftdistError(f"the adapter adapts {unused[0]} ({len(unused)} in all), which the base model "
                                 "does not have; was it trained from another base model?")


def _quantized_weights(base: Path, load_dtype: torch.dtype) -> set[str]:
    """Which weights QLoRA loading turned into 4-bit: transformers' own choice, replayed on a meta model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    from swiftdist.model import qlora_config

    config = qlora_config(load_dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    skip = AutoHfQuantizer.from_config(config).get_modules_to_not_convert(
        model, config.llm_int8_skip_modules, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    return {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def _nf4_roundtrip(w: torch.Tensor, load_dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from swiftdist.model import qlora_config

    config = qlora_config(load_dtype)
    # Params4bit quantises when moved to a device: the same path (block size, double quant) as loading.
    q = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=config.bnb_4bit_use_double_quant,
                          quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage).to(w.device)
    return F.dequantize_4bit(q.data, q.quant_state)


# ---- writing -----------------------------------------------------------------------------------


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, dtype: torch.dtype, max_bytes: int) -> None:
    """safetensors shards of at most max_bytes (a bigger single tensor gets its own), plus the index."""
    out.mkdir(parents=True)
    files, shard, size, total = [], {}, 0, 0

    def flush():
        name = f"part-{len(files):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        files.append((name, list(shard)))

    for name, t in tensors:
        t = t.to(dtype).contiguous()
        if shard and size + t.nbytes > max_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t
        size += t.nbytes
        total += t.nbytes
    if shard:
        flush()
    if len(files) == 1:
        os.replace(out / files[0][0], out / "model.safetensors")
        return
    # The shard count is known only at the end: name the files HF's way now.
    weight_map = {}
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(out / name, out / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(base: Path, out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoConfig, GenerationConfig

    from swiftdist.model import load_tokenizer

    config = AutoConfig.from_pretrained(base)
    config.dtype = dtype
    config.use_cache = True  # training turned it off
    config.save_pretrained(out)
    if (base / "generation_config.json").exists():
        GenerationConfig.from_pretrained(base).save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="swiftdist export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint dir, a checkpoints/ dir or an output dir")
    parser.add_argument("--to", required=True, help="new output directory")
    parser.add_argument("--merge-lora", action="store_true", help="LoRA/QLoRA: merge into the base weights")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="weight dtype of the export (auto: the dtype the weights were trained in)")
    parser.add_argument("--base-model", help="the base model dir, when it moved since training")
    parser.add_argument("--max-shard-mb", type=int, default=2048, help="size of each safetensors file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    # Reading a DCP checkpoint in one process is what we want; torch warns that no group exists.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    t0 = time.perf_counter()
    out = export(args.checkpoint, args.to, args.merge_lora, args.dtype, args.base_model, args.max_shard_mb)
    log.info("exported %s to %s in %.1fs", args.checkpoint, out, time.perf_counter() - t0)
    return 0
