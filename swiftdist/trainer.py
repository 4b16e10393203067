"""The supervised fine-tuning loop. Strategy-specific work goes through `self.strategy` verbs only,
checkpoints through `self.checkpointer`, data order and run length through `self.sampler`.

Raises SwiftdistError for impossible strategy x train-type x precision combinations (before any
model is loaded), bad data or model paths, changed data on resume, a failed save, a non-finite loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from swiftdist import preemption, sequence_parallel
from swiftdist.checkpoint import Checkpointer, run_identity
from swiftdist.config import RunConfig, save_config
from swiftdist.data import IGNORE, Sample, StepSampler, build_datasets, collate
from swiftdist.distributed import DistInfo, any_rank
from swiftdist.errors import SwiftdistError
from swiftdist.loss import target_count
from swiftdist.metrics import Metrics, peak_memory_gib, record_samples
from swiftdist.model import (count_params, load_model_config, load_tokenizer, resolve_attn_impl, resolve_model_path,
                             resolve_precision, weight_dtype)
from swiftdist.schedule import lr_at
from swiftdist.strategies import choose as choose_strategy

log = logging.getLogger("swiftdist")
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped by a signal", after a checkpoint was saved


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.output_dir = Path(cfg.checkpoint.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)  # by every rank: each may write its sample log first
        self.precision = resolve_precision(cfg.train.precision)
        model_path = resolve_model_path(cfg.model.model)
        strategy = choose_strategy(cfg, self.precision, dist_info)  # refused here, before anything loads
        sequence_parallel.check(cfg.parallel.sequence_parallel, dist_info.world_size,
                                load_model_config(model_path, cfg.model.trust_remote_code), strategy.runs_hf_model)
        self.strategy = strategy(cfg, dist_info, self.precision)
        self.sp = sequence_parallel.SequenceParallel.setup(cfg.parallel.sequence_parallel, cfg.data.packing)
        self.tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        self.checkpointer = Checkpointer(cfg, dist_info, self.strategy, self.tokenizer)
        found = self.checkpointer.find()
        self.data = build_datasets(self.tokenizer, cfg.data, cfg.train.seed)
        identity = run_identity(model_path, cfg.data, cfg.train.seed, self.data.sources, self.data.train)
        same_data = found is None or self.checkpointer.check_data(*found, identity)  # refused before the model loads
        # What `auto` means depends on the rows: decided once, here (config.yaml records the choice).
        self.attn_impl = resolve_attn_impl(cfg.model.attn_impl, max(len(s.input_ids) for s in self.data.train),
                                           precision=self.precision)
        trainable, total = self._setup_model(model_path)
        # The ranks of a sequence-parallel group read the same samples, each its slice of them.
        self.data_rank, self.data_size = self.sp.data_split(self.strategy.dp_rank, self.strategy.dp_size)
        self.sampler = StepSampler(len(self.data.train), cfg.train.seed, cfg.train.batch_size,
                                   cfg.train.grad_accum, self.data_rank, self.data_size)
        self.state = self.checkpointer.new_state(model_path, str(weight_dtype(cfg.model, self.precision))
                                                 .removeprefix("torch."), identity)
        if found:
            self.checkpointer.restore(*found, self.state, keep_position=same_data)
        self._plan_run(found[1] if found and same_data else None)
        self.metrics = Metrics(str(self.output_dir), list(cfg.log.report_to), self.total_steps, self.state.step,
                               cfg.log.wandb_project, cfg.log.wandb_mode, OmegaConf.to_container(OmegaConf.structured(cfg)),
                               run_id=self.state.wandb_run_id, enabled=dist_info.is_main)
        if dist_info.is_main:
            resolved = replace(cfg, model=replace(cfg.model, attn_impl=self.attn_impl))  # what ran, not "auto"
            save_config(resolved, str(self.output_dir / "config.yaml"))
            log.info("model %s: %.2fM params, %.2fM trainable (%s, %s, %s attention, strategy %s, %d ranks)",
                     model_path, total / 1e6, trainable / 1e6, cfg.model.train_type, self.precision,
                     self.attn_impl, self.strategy.name, dist_info.world_size)
            log.info("data: %d train / %d eval samples; global batch %d; %d steps to go",
                     len(self.data.train), len(self.data.val), self.sampler.global_batch,
                     self.total_steps - self.state.step)

    def _setup_model(self, model_path: Path) -> tuple[int, int]:
        # Every rank must build the same initial weights (LoRA's random A matrices too): sharded
        # strategies keep each rank's own slice of them instead of broadcasting rank 0's copy.
        torch.manual_seed(self.cfg.train.seed)
        model = self.strategy.build_model(model_path, self.attn_impl)
        counts = count_params(model, self.strategy.param_shape)
        self.sp.apply(model)
        self.strategy.wrap(model)
        return counts

    def _plan_run(self, saved) -> None:
        """The run's length in samples is fixed at its first start (a resume on another world size keeps its
        length and LR schedule); changing --max-steps or --epochs on resume resizes it."""
        t, s = self.cfg.train, self.state
        same_length = saved and saved.total_samples and (saved.max_steps, saved.epochs) == (t.max_steps, t.epochs)
        s.total_samples = saved.total_samples if same_length else self.sampler.run_length(t.max_steps, t.epochs)
        self.total_steps = s.step + self.sampler.steps_left(s.consumed_in_epoch, s.consumed_total, s.total_samples)

    def train(self) -> int:
        """Runs to the end (returns 0) or until preempted (returns PREEMPTED_EXIT_CODE after saving)."""
        cfg, state = self.cfg, self.state
        preemption.install()  # `python -m swiftdist.sft` did already; an in-process run did not
        self.strategy.model.train()  # from_pretrained returns eval mode: dropout would be off
        first_step = state.step
        while state.consumed_total < state.total_samples:
            t0 = time.perf_counter()
            micro_batches, seeds, n_samples, counts = self._next_batches()
            # One collective for both counts: label tokens normalise the loss, all tokens give throughput.
            label_tokens, tokens = self.strategy.all_reduce_dp(counts.to(self.dist.device))
            loss = self.strategy.forward_backward(micro_batches, label_tokens / self.strategy.dp_size, seeds)
            grad_norm = self.strategy.clip_grad_norm(cfg.train.max_grad_norm)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise SwiftdistError(f"step {state.step + 1}: loss {loss.item()} / grad norm {grad_norm.item()} "
                                     "is not finite; lower --lr or use --precision fp32")
            # The schedule is read at the middle of the step: the first step does not waste a zero lr.
            lr = lr_at((state.consumed_total + n_samples / 2) / state.total_samples, cfg.train)
            self.strategy.step(lr)
            state.advance(n_samples, len(self.data.train))
            self._log_step(loss, grad_norm, lr, tokens.item(), time.perf_counter() - t0)
            if state.step == first_step + 1:  # the optimizer state exists from the first step on
                self.metrics.log_held_bytes(state.step, self.strategy.state_bytes())
            if self._eval_due():
                self.metrics.log({"step": state.step, "eval_loss": self.evaluate()})
            # Every rank must take the same branch: rank 0's clock and any rank's signal decide for all.
            stop, due = any_rank(preemption.requested() is not None,
                                 self.dist.is_main and self.checkpointer.due_by_time())
            if stop:
                log.warning("stop signal received: saving a checkpoint at step %d and exiting", state.step)
            if due or stop or (cfg.checkpoint.save_steps and state.step % cfg.checkpoint.save_steps == 0):
                self.checkpointer.save(state)
            if stop:
                self.metrics.close(plot=False)  # seconds of matplotlib the grace period may not have
                preemption.clear()
                return PREEMPTED_EXIT_CODE
        if self.data.val and not self._eval_due():  # the end always gets an eval, but only one
            self.metrics.log({"step": state.step, "eval_loss": self.evaluate()})
        if self.checkpointer.saved_step != state.step:
            self.checkpointer.save(state)
        self.checkpointer.export_final()
        self.metrics.close()
        return 0

    def _next_batches(self) -> tuple[list[dict], list[int], int, torch.Tensor]:
        """This rank's micro-batches for the next step with their dropout seeds, the step's sample count
        (all ranks), and this rank's [label tokens, tokens] (counted on the host, so no device sync)."""
        s, train = self.state, self.data.train
        left = s.total_samples - s.consumed_total
        chosen = self.sampler.step_indices(s.epoch, s.consumed_in_epoch, left)
        micro_batches, seeds, n_labels, n_tokens = [], [], 0, 0
        for position, idx in chosen:
            batch = self._host_batch([train[i] for i in idx])
            n_labels += target_count(batch).item()
            n_tokens += sum(len(train[i].input_ids) for i in idx) / self.sp.size  # a group shares its samples
            micro_batches.append(self._on_device(batch))
            # Dropout randomness derives from the sample's position in the run, so a resumed run (on
            # any number of ranks, same micro-batch size) draws what the uninterrupted one would have.
            seeds.append((self.cfg.train.seed * 1_000_003 + s.step * 100_003 + position) % 2**63)
        if self.cfg.log.log_samples:
            record_samples(self.output_dir, self.dist.rank, s.step + 1, s.epoch,
                           [train[i].sample_ids for _, idx in chosen for i in idx])
        n_samples = self.sampler.step_size(s.consumed_in_epoch, left)
        return micro_batches, seeds, n_samples, torch.tensor([n_labels, n_tokens], dtype=torch.float32)

    def _host_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Collated on the host. A rank with no samples (a short last step, a short eval split)
        still joins the collectives, with one padding token whose label is ignored."""
        pad = self.tokenizer.pad_token_id
        # flash-attention takes a micro-batch as one row with explicit sample boundaries: no padding at all.
        flat = self.strategy.runs_hf_model and self.attn_impl == "flash_attention_2"
        return self.sp.shard(collate(samples or [Sample([pad], [IGNORE], [0], [])], pad, self.cfg.data.packing, flat))

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _log_step(self, loss, grad_norm, lr, tokens: float, seconds) -> None:
        self.metrics.advance(1, loss=loss.item())
        if self.state.step % self.cfg.log.log_steps == 0 or self.state.step == self.total_steps:
            self.metrics.log({
                "step": self.state.step, "epoch": self.state.epoch + self.state.consumed_in_epoch / len(self.data.train),
                "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
                "tokens_per_s": tokens / seconds, "step_s": seconds, "peak_mem_gib": peak_memory_gib(self.dist.device),
            })

    @torch.no_grad()
    def evaluate(self) -> float:
        val, bs = self.data.val, self.cfg.train.batch_size
        mine = val[self.data_rank::self.data_size]
        n_batches = -(-len(val[0::self.data_size]) // bs)  # every rank runs as many forwards (ZeRO-3 gathers)
        loss_sum = torch.zeros((), device=self.dist.device)
        tokens = torch.zeros((), device=self.dist.device)
        self.strategy.model.eval()
        for i in range(n_batches):
            batch = self._on_device(self._host_batch(mine[i * bs:(i + 1) * bs]))
            loss_sum += self.strategy.forward_loss_sum(batch)
            tokens += target_count(batch)
        self.strategy.model.train()
        return (self.strategy.all_reduce_dp(loss_sum) / self.strategy.all_reduce_dp(tokens.float())).item()

    def _eval_due(self) -> bool:
        return bool(self.data.val) and self.cfg.train.eval_steps > 0 and self.state.step % self.cfg.train.eval_steps == 0
