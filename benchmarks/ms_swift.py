"""ms-swift (4.x), the framework swiftdist is modelled on, on the same job.

`[torchrun ...] MS_SWIFT_PYTHON -m benchmarks.ms_swift SPEC.json RUN_DIR DATA.jsonl MODEL_DIR SYSTEM`, run
with the Python of an environment that has ms-swift (it pins its own transformers, so it does not
share swiftdist's; benchmarks/README.md says how to make one). Nothing here imports swiftdist.

The suite writes DATA.jsonl: the job's conversations in the order swiftdist draws them, so with
ms-swift's two shuffles off, one process sees the same samples at every step. ms-swift renders them
with its own chatml template and SmolLM2's default system prompt (SYSTEM), which gives the same
tokens as the model's chat template up to where the labels start and stop.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.update(HF_HUB_OFFLINE="1", MODELSCOPE_OFFLINE="1", CUDA_VISIBLE_DEVICES="")

from swift import SftArguments, sft_main  # noqa: E402
from swift.callbacks import callbacks_map  # noqa: E402

from benchmarks.probe import report  # noqa: E402
from benchmarks.spec import BenchSpec  # noqa: E402
from benchmarks.step_clock import StepClock  # noqa: E402


class LoopClock(StepClock):
    """StepClock plus this process's CPU time over the training loop, taken over the same span as
    benchmarks/swiftdist_worker.py takes it (the loop, not the model load or data preparation)."""

    def on_train_begin(self, args, state, control, **kw):
        self.cpu_s = time.process_time()
        super().on_train_begin(args, state, control, **kw)

    def on_train_end(self, args, state, control, **kw):
        self.cpu_s = time.process_time() - self.cpu_s


def main(spec_path: str, run_dir: str, data: str, model_dir: str, system: str) -> None:
    spec = BenchSpec.load(spec_path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    clock = LoopClock()
    # ms-swift builds its Trainer's callbacks from names in this map (swift/trainers/mixin.py).
    callbacks_map["swiftdist_step_clock"] = lambda args, trainer: clock
    args = SftArguments(
        model=model_dir, model_type="llama", template="chatml", system=system, use_hf=True,
        dataset=[data], split_dataset_ratio=0.0, dataset_shuffle=False, train_dataloader_shuffle=False,
        tuner_type=spec.train_type, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
        target_modules=["all-linear"],
        # The weights as in swiftdist and the other peers: a bf16 frozen base for LoRA, fp32 for full.
        torch_dtype="bfloat16" if spec.precision == "bf16" and spec.train_type == "lora" else "float32",
        # Both explicit: with fp32 weights ms-swift would otherwise turn fp16 on as well.
        bf16=spec.precision == "bf16", fp16=False, use_cpu=True,
        gradient_checkpointing=spec.gradient_checkpointing,  # its default is on; the job says otherwise
        max_length=spec.max_length, packing=spec.packing,
        per_device_train_batch_size=spec.micro_batch(world), gradient_accumulation_steps=1, max_steps=spec.steps,
        learning_rate=spec.lr, lr_scheduler_type="cosine", warmup_ratio=spec.warmup_ratio,
        weight_decay=spec.weight_decay, adam_beta1=spec.betas[0], adam_beta2=spec.betas[1],
        max_grad_norm=spec.max_grad_norm, seed=spec.seed, data_seed=spec.seed, dataloader_num_workers=0,
        save_strategy="no", eval_strategy="no", report_to=["none"], logging_steps=1,
        output_dir=os.path.join(run_dir, "output"), add_version=False,
        check_model=False,  # else it asks the model hub whether the local model is the latest (~8 s offline)
        callbacks=["swiftdist_step_clock"])
    sft_main(args)
    report(run_dir, clock.step_s, clock.losses, cpu_s_per_step=clock.cpu_s / max(len(clock.step_s), 1))


if __name__ == "__main__":
    main(*sys.argv[1:])
