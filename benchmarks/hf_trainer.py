"""HF `Trainer` (with accelerate), the tool most users try first, on the same job.

`python -m benchmarks.hf_trainer SPEC.json RUN_DIR`. Batches come in the order swiftdist draws
them (the spec's seeded permutation, then a sequential sampler), so the tokens per step match.
"""

from __future__ import annotations

import sys

import torch
from transformers import Trainer, TrainingArguments

from benchmarks.probe import report
from benchmarks.spec import BenchSpec, peer_model
from benchmarks.step_clock import StepClock
from swiftdist.data import StepSampler, collate


def main(spec_path: str, run_dir: str) -> None:
    spec = BenchSpec.load(spec_path)
    model, tokenizer, train = peer_model(spec)
    order = StepSampler(len(train), spec.seed, spec.global_batch, 1, 0, 1).permutation(0)
    rows = [train[i] for i in order]
    args = TrainingArguments(
        output_dir=run_dir, max_steps=spec.steps, per_device_train_batch_size=spec.global_batch,
        learning_rate=spec.lr, weight_decay=spec.weight_decay, adam_beta1=spec.betas[0], adam_beta2=spec.betas[1],
        lr_scheduler_type="cosine", warmup_steps=spec.warmup_ratio, max_grad_norm=spec.max_grad_norm,
        bf16=spec.precision == "bf16", use_cpu=not torch.cuda.is_available(), seed=spec.seed,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        gradient_checkpointing=False,  # peer_model already applied the spec's choice
    )
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock],
                      data_collator=lambda samples: collate(samples, tokenizer.pad_token_id, spec.packing))
    trainer.train()
    report(run_dir, clock.step_s, clock.losses)


if __name__ == "__main__":
    main(*sys.argv[1:])
