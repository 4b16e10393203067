"""The supervised fine-tuning loop. Strategy-specific work goes through `self.strategy` verbs only.

Features: gradient accumulation, global token-mean loss, grad clipping, AdamW with warmup +
cosine/linear decay, periodic eval, atomic checkpoints with exact resume (same or different world
size), preemption (SIGTERM/SIGUSR1 -> save -> exit 143), metrics to terminal/jsonl/wandb.

Raises SwiftdistError for impossible strategy x train-type x precision combinations (before any
model is loaded), bad data, bad model paths, and a non-finite loss or gradient.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from swiftdist import checkpoint, preemption
from swiftdist.config import RunConfig, save_config
from swiftdist.data import IGNORE, Sample, StepSampler, build_datasets, collate
from swiftdist.distributed import DistInfo, barrier
from swiftdist.errors import SwiftdistError
from swiftdist.loss import label_count
from swiftdist.metrics import Metrics, peak_memory_gib
from swiftdist.model import (count_params, load_tokenizer, resolve_attn_impl, resolve_model_path, resolve_precision,
                             weight_dtype)
from swiftdist.strategies import get_strategy_class

log = logging.getLogger("swiftdist")
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped by a signal", after a checkpoint was saved


def lr_at(progress: float, cfg) -> float:
    """Learning rate at `progress` = fraction of the run's samples consumed (world-size independent)."""
    warmup = cfg.warmup_ratio
    if progress < warmup:
        return cfg.lr * (progress / warmup)
    decay = min(1.0, (progress - warmup) / max(1e-12, 1.0 - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.scheduler == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * decay))
    if cfg.scheduler == "linear":
        return floor + (cfg.lr - floor) * (1.0 - decay)
    return cfg.lr


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info: DistInfo):
        self.cfg, self.dist = cfg, dist_info
        self.output_dir = Path(cfg.checkpoint.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)  # by every rank: each may write its sample log first
        self.precision = resolve_precision(cfg.train.precision)
        self.strategy = self._setup_strategy()
        found = self._find_checkpoint()
        model_path = resolve_model_path(cfg.model.model)
        self.tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        self.data = build_datasets(self.tokenizer, cfg.data, cfg.train.seed)
        # `auto` becomes the implementation this run uses (config.yaml records it): it depends on the rows.
        cfg.model.attn_impl = resolve_attn_impl(cfg.model.attn_impl, max(len(s.input_ids) for s in self.data.train))
        # Every rank must build the same initial weights (LoRA's random A matrices too): sharded
        # strategies keep each rank's own slice of them instead of broadcasting rank 0's copy.
        torch.manual_seed(cfg.train.seed)
        model = self.strategy.build_model(model_path)
        trainable, total = count_params(model)
        self.strategy.wrap(model)
        self.sampler = StepSampler(len(self.data.train), cfg.train.seed, cfg.train.batch_size,
                                   cfg.train.grad_accum, self.strategy.dp_rank, self.strategy.dp_size)
        self.state = checkpoint.TrainerState(world_size=dist_info.world_size, dp_size=self.strategy.dp_size,
                                             strategy=self.strategy.name,
                                             checkpoint_format=self.strategy.checkpoint_format,
                                             train_type=cfg.model.train_type, model=str(model_path),
                                             base_dtype=str(weight_dtype(cfg.model, self.precision)).removeprefix("torch."),
                                             max_steps=cfg.train.max_steps, epochs=cfg.train.epochs,
                                             versions=_versions())
        self._saved_step = -1
        saved = self._resume(found)
        self.total_samples = self.state.total_samples = self._run_length(saved)
        self.total_steps = self.state.step + self._steps_left()
        self.metrics = Metrics(str(self.output_dir), list(cfg.log.report_to), self.total_steps, self.state.step,
                               cfg.log.wandb_project, cfg.log.wandb_mode, OmegaConf.to_container(OmegaConf.structured(cfg)),
                               enabled=dist_info.is_main)
        if dist_info.is_main:
            save_config(cfg, str(self.output_dir / "config.yaml"))
            log.info("model %s: %.2fM params, %.2fM trainable (%s, %s, %s attention, strategy %s, %d ranks)",
                     model_path, total / 1e6, trainable / 1e6, cfg.model.train_type, self.precision,
                     cfg.model.attn_impl, cfg.parallel.strategy, dist_info.world_size)
            log.info("data: %d train / %d eval samples; global batch %d; %d steps to go",
                     len(self.data.train), len(self.data.val), self.sampler.global_batch, self._steps_left())

    # ---- setup -------------------------------------------------------------------------------

    def _setup_strategy(self):
        cls = get_strategy_class(self.cfg.parallel.strategy).resolve(self.cfg, self.precision, self.dist)
        reason = cls.refusal(self.cfg, self.precision)
        if reason:
            raise SwiftdistError(f"--strategy {cls.name} --train-type {self.cfg.model.train_type} "
                                 f"--precision {self.precision}: {reason}")
        return cls(self.cfg, self.dist, self.precision)

    def _find_checkpoint(self) -> tuple[Path, checkpoint.TrainerState] | None:
        """The checkpoint to resume from, refused before any model loads if this run cannot continue it."""
        if self.dist.is_main:
            checkpoint.clean_partial(str(self.output_dir))
        barrier()
        path = checkpoint.resolve_resume(self.cfg.checkpoint.resume, str(self.output_dir))
        if path is None:
            return None
        saved = checkpoint.TrainerState.from_file(path / checkpoint.STATE_FILE)
        checkpoint.check_resumable(saved, path, self.cfg.model.train_type, self.strategy.name,
                                   self.strategy.checkpoint_format)
        return path, saved

    def _resume(self, found: tuple[Path, checkpoint.TrainerState] | None) -> checkpoint.TrainerState | None:
        if found is None:
            return None
        path, saved = found
        t0 = time.perf_counter()
        self.strategy.load(str(path / "model"), saved)
        for key in ("step", "epoch", "consumed_in_epoch", "consumed_total"):
            setattr(self.state, key, getattr(saved, key))
        self._saved_step = saved.step
        log.info("resumed from %s at step %d (epoch %d, sample %d; saved by %d ranks, now %d) in %.1fs",
                 path, saved.step, saved.epoch, saved.consumed_in_epoch, saved.world_size,
                 self.dist.world_size, time.perf_counter() - t0)
        return saved

    def _run_length(self, saved: checkpoint.TrainerState | None) -> int:
        """Samples the whole run trains on, fixed at its first start. --max-steps counts steps of the first
        start's global batch, so a run resumed on another world size keeps its length and LR schedule;
        changing --max-steps or --epochs on resume resizes it."""
        t = self.cfg.train
        if saved and saved.total_samples and (saved.max_steps, saved.epochs) == (t.max_steps, t.epochs):
            return saved.total_samples
        return t.max_steps * self.sampler.global_batch if t.max_steps > 0 else t.epochs * len(self.data.train)

    def _steps_left(self) -> int:
        """Steps until total_samples are consumed, walking epoch boundaries (last step of an epoch is short)."""
        steps, epoch, in_epoch, done = 0, self.state.epoch, self.state.consumed_in_epoch, self.state.consumed_total
        n, g = len(self.data.train), self.sampler.global_batch
        while done < self.total_samples:
            take = min(g, n - in_epoch)
            steps, done, in_epoch = steps + 1, done + take, in_epoch + take
            if in_epoch == n:
                epoch, in_epoch = epoch + 1, 0
        return steps

    # ---- the loop ----------------------------------------------------------------------------

    def train(self) -> int:
        """Runs to the end (returns 0) or until preempted (returns PREEMPTED_EXIT_CODE after saving)."""
        cfg = self.cfg
        preemption.install()  # `python -m swiftdist.sft` did already; an in-process run did not
        self.strategy.model.train()  # from_pretrained returns eval mode: dropout would be off
        first_step = self.state.step
        while self.state.consumed_total < self.total_samples:
            t0 = time.perf_counter()
            micro_batches, n_samples, counts = self._next_batches()
            # Dropout randomness derives from the position, so a resumed run (on any number of
            # ranks) draws exactly what the uninterrupted one would have drawn.
            torch.manual_seed(cfg.train.seed * 1_000_003 + self.state.step * 1009 + self.strategy.rng_rank)
            # One collective for both counts: label tokens normalise the loss, all tokens give throughput.
            label_tokens, tokens = self.strategy.all_reduce_dp(counts.to(self.dist.device))
            loss = self.strategy.forward_backward(micro_batches, label_tokens / self.strategy.dp_size)
            grad_norm = self.strategy.clip_grad_norm(cfg.train.max_grad_norm)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise SwiftdistError(f"step {self.state.step + 1}: loss {loss.item()} / grad norm {grad_norm.item()} "
                                     "is not finite; lower --lr or use --precision fp32")
            # The schedule is read at the middle of the step: the first step does not waste a zero lr.
            lr = lr_at((self.state.consumed_total + n_samples / 2) / self.total_samples, cfg.train)
            self.strategy.step(lr)
            self._advance(n_samples)
            self._log_step(loss, grad_norm, lr, tokens.item(), time.perf_counter() - t0)
            if self.state.step == first_step + 1:  # the optimizer state exists from the first step on
                self._log_state()
            if self._eval_due():
                self._log_eval()
            if cfg.checkpoint.save_steps and self.state.step % cfg.checkpoint.save_steps == 0:
                self.save()
            if self._preempted():
                log.warning("stop signal received: saving a checkpoint at step %d and exiting", self.state.step)
                if self._saved_step != self.state.step:
                    self.save()
                self.metrics.close()
                preemption.clear()
                return PREEMPTED_EXIT_CODE
        if self.data.val and not self._eval_due():  # the end always gets an eval, but only one
            self._log_eval()
        if self._saved_step != self.state.step:
            self.save()
        self.export_final()
        self.metrics.close()
        return 0

    def _next_batches(self) -> tuple[list[dict], int, torch.Tensor]:
        """This rank's micro-batches for the next step, the step's sample count (all ranks), and this
        rank's [label tokens, tokens] (counted on the host, so no device sync)."""
        indices = self.sampler.step_indices(self.state.epoch, self.state.consumed_in_epoch)
        train = self.data.train
        micro_batches, n_labels, n_tokens = [], 0, 0
        for idx in indices:
            batch = self._host_batch([train[i] for i in idx])
            n_labels += label_count(batch["labels"]).item()
            n_tokens += sum(len(train[i].input_ids) for i in idx)
            micro_batches.append({k: v.to(self.dist.device) for k, v in batch.items()})
        n_samples = min(self.sampler.global_batch, len(train) - self.state.consumed_in_epoch)
        if self.cfg.log.log_samples:
            self._record_samples([train[i].sample_ids for idx in indices for i in idx])
        return micro_batches, n_samples, torch.tensor([n_labels, n_tokens], dtype=torch.float32)

    def _host_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Collated on the host. A rank with no samples (a short last step, a short eval split)
        still joins the collectives, with one padding token whose label is ignored."""
        pad = self.tokenizer.pad_token_id
        return collate(samples or [Sample([pad], [IGNORE], [0], [])], pad, self.cfg.data.packing)

    def _advance(self, n_samples: int) -> None:
        s = self.state
        s.step += 1
        s.consumed_total += n_samples
        s.consumed_in_epoch += n_samples
        if s.consumed_in_epoch >= len(self.data.train):
            s.epoch, s.consumed_in_epoch = s.epoch + 1, 0

    # ---- logging and eval ---------------------------------------------------------------------

    def _log_step(self, loss, grad_norm, lr, tokens: float, seconds) -> None:
        self.metrics.advance(1, loss=loss.item())
        if self.state.step % self.cfg.log.log_steps == 0 or self.state.step == self.total_steps:
            self.metrics.log({
                "step": self.state.step, "epoch": self.state.epoch + self.state.consumed_in_epoch / len(self.data.train),
                "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr,
                "tokens_per_s": tokens / seconds, "step_s": seconds,
                "peak_mem_gib": peak_memory_gib(self.dist.device),
            })

    def _log_state(self) -> None:
        """What rank 0 holds of parameters and optimizer state, per device type (shows sharding and offload)."""
        held = self.strategy.state_bytes()
        self.metrics.log({"step": self.state.step, **{f"{kind}_mib_{device}": n / 2**20
                                                      for kind, devices in held.items() for device, n in devices.items()}})

    @torch.no_grad()
    def evaluate(self) -> float:
        val = self.data.val
        rank, world, bs = self.strategy.dp_rank, self.strategy.dp_size, self.cfg.train.batch_size
        mine = val[rank::world]
        n_batches = -(-len(val[0::world]) // bs)  # every rank runs the same number of forwards (ZeRO-3 gathers)
        loss_sum = torch.zeros((), device=self.dist.device)
        tokens = torch.zeros((), device=self.dist.device)
        self.strategy.model.eval()
        for i in range(n_batches):
            batch = {k: v.to(self.dist.device) for k, v in self._host_batch(mine[i * bs:(i + 1) * bs]).items()}
            loss_sum += self.strategy.forward_loss_sum(batch)
            tokens += label_count(batch["labels"])
        self.strategy.model.train()
        return (self.strategy.all_reduce_dp(loss_sum) / self.strategy.all_reduce_dp(tokens.float())).item()

    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_steps
        return bool(self.data.val) and every > 0 and self.state.step % every == 0

    def _log_eval(self) -> None:
        self.metrics.log({"step": self.state.step, "eval_loss": self.evaluate()})

    def _record_samples(self, sample_ids: list[list[int]]) -> None:
        path = self.output_dir / f"samples-rank{self.dist.rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.state.step + 1, "epoch": self.state.epoch, "samples": sample_ids}) + "\n")

    # ---- saving and preemption ----------------------------------------------------------------

    def save(self) -> Path | None:
        t0 = time.perf_counter()
        tmp = checkpoint.tmp_dir(str(self.output_dir), self.state.step)
        if self.dist.is_main:
            checkpoint.prepare(tmp)
        barrier()
        self.strategy.save(str(tmp / "model"))
        if self._adapter_only or self.cfg.checkpoint.save_full_model:
            self._save_hf(tmp / ("adapter" if self._adapter_only else "hf"))
        barrier()  # every rank's shards are on disk before the checkpoint is marked complete
        final = None
        if self.dist.is_main:
            final = checkpoint.commit(tmp, self.state, self.cfg.checkpoint.save_total_limit)
            log.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        barrier()
        self._saved_step = self.state.step
        return final

    @property
    def _adapter_only(self) -> bool:
        """LoRA/QLoRA: what is saved for users is the adapter; the frozen base comes from the model path."""
        return self.cfg.model.train_type != "full"

    def _save_hf(self, out: Path) -> None:
        """The peft adapter (LoRA) or the whole HF model (full; gathered on rank 0), with the tokenizer."""
        state = self.strategy.full_state_dict(trainable_only=self._adapter_only)
        if self.dist.is_main:
            self.strategy.save_hf(out, state)
            self.tokenizer.save_pretrained(out)

    def export_final(self) -> None:
        """The result users load: output_dir/final, a peft adapter or a full HF model."""
        self._save_hf(self.output_dir / "final")
        if self.dist.is_main:
            log.info("final %s saved to %s", "adapter" if self._adapter_only else "model",
                     self.output_dir / "final")
        barrier()

    def _preempted(self) -> bool:
        """All ranks agree at a step boundary: if any rank was signalled, every rank saves and stops."""
        flag = torch.tensor([1.0 if preemption.requested() else 0.0], device=self.dist.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _versions() -> dict:
    import transformers

    import swiftdist

    versions = {"swiftdist": swiftdist.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions
