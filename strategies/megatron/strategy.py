"""Megatron-core tensor (--tp) and pipeline (--pp) parallelism for HF Llama / Qwen2 models.

The strategy builds an mcore GPTModel chunk per rank from the HF config, fills it from the HF
safetensors through `bridge` (each rank reads only its slices), puts LoRA on mcore's parallel
linear layers (`lora`), and runs each step's micro-batches through megatron's pipeline schedules.
Ranks are laid out tp x pp x dp; data parallelism is whatever world size is
left, with gradients averaged over the data-parallel group after the schedule.

Checkpoints use megatron-core distributed checkpointing, keyed by HF tensor names and HF axes, so
a checkpoint resumes on any TP x PP x DP layout and `swiftdist export` reads HF tensors straight
from it. Sequence parallelism is on with CUDA and TP > 1.

Limits: Llama and Qwen2 families without rope scaling; no QLoRA (refused); no activation
recompute; no interleaved (virtual) pipeline; the torch AdamW rather than megatron's distributed
optimizer (which needs deeper CPU patches), so optimizer state is replicated over data parallel.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from swiftdist.data import IGNORE
from swiftdist.errors import SwiftdistError
from swiftdist.loss import shifted_targets
from swiftdist.strategies.base import Strategy, build_optimizer
from swiftdist.strategies.dcp import read_tensors
from swiftdist.strategies.megatron import bridge, cpu_compat, lora


class MegatronStrategy(Strategy):
    name = "megatron"
    checkpoint_format = "megatron-dist"
    owned_flags = dict.fromkeys(("tp", "pp"), "--tp/--pp split the model with megatron-core; use --strategy megatron, "
                                              "or leave them at 1")
    runs_hf_model = False

    @classmethod
    def refusal(cls, cfg, precision: str) -> str | None:
        if cfg.model.train_type == "qlora":
            return ("megatron-core has no 4-bit linear layers; use --train-type lora here, "
                    "or --strategy fsdp with --train-type qlora")
        if cfg.model.gradient_checkpointing:
            return "activation recompute is not wired up for megatron yet; drop --gradient-checkpointing"
        return super().refusal(cfg, precision)  # other backends' flags (--deepspeed-config)

    def __init__(self, cfg, dist_info, precision: str):
        super().__init__(cfg, dist_info, precision)
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        if dist_info.world_size % (tp * pp):
            raise SwiftdistError(f"--tp {tp} x --pp {pp} = {tp * pp} must divide the world size "
                                 f"{dist_info.world_size}; launch a multiple of {tp * pp} processes")
        # mcore announces at import that it falls back from Apex / Transformer Engine kernels to its
        # local ones; that is the intended setup here, not something for the user to act on.
        warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed", category=UserWarning)
        from megatron.core import parallel_state as mpu

        # What this run changes process-wide (CPU patches, model-parallel groups) is undone by close().
        with contextlib.ExitStack() as run:
            run.enter_context(cpu_compat.patched())
            mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            run.callback(mpu.destroy_model_parallel)
            self._teardown = run.pop_all()
        self.mpu = mpu
        self.tp, self.pp = tp, pp
        self.tp_rank = mpu.get_tensor_model_parallel_rank()
        self.chunks: list[torch.nn.Module] = []

    def close(self) -> None:
        self._teardown.close()

    @property
    def dp_rank(self) -> int:
        return self.mpu.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.mpu.get_data_parallel_world_size()

    # ---- building -----------------------------------------------------------------------------

    def build_model(self, path: Path, attn_impl: str | None = None) -> torch.nn.Module:  # mcore's own attention
        from megatron.core import tensor_parallel
        from transformers import AutoConfig

        self.hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=self.cfg.model.trust_remote_code)
        bridge.check_layout(self.hf_cfg, self.tp, self.pp, None)
        full = self.cfg.model.train_type == "full"
        self.config = bridge.transformer_config(
            self.hf_cfg, self.tp, self.pp, None,
            sequence_parallel=torch.cuda.is_available() and self.tp > 1,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(self.cfg.train.seed)
        model = bridge.build_model(self.hf_cfg, self.config)
        self.layout = bridge.Layout(self.hf_cfg)
        bridge.load_hf_weights([model], self.layout, Path(path), self.tp_rank, self.tp)
        if not full:
            self.lora_targets = lora.add_lora(model, self.cfg.model, self.config.sequence_parallel)
            lora.init_lora(model, self.layout, self.cfg.train.seed, self.tp_rank, self.tp)
        return model

    def wrap(self, model) -> None:
        # Built and filled on the host (use_cpu_initialization: each rank reads only its slices), then
        # placed on the rank's device, as megatron's own training loop does after building.
        self.chunks = [model.to(self.dist.device)]
        self.model = torch.nn.ModuleList(self.chunks)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.entries = [e for chunk in self.chunks for e in self.layout.entries(chunk)]

    # ---- one optimizer step -------------------------------------------------------------------

    def _mcore_batch(self, batch: dict) -> dict:
        """HF batch -> mcore inputs: shifted labels with a loss mask, and a boolean attention mask
        (True = hidden) that is causal within each sample: a new sample starts where position_ids
        restart at 0, so packed rows and right padding need no other information."""
        ids, pos = batch["input_ids"], batch["position_ids"]
        if self.config.sequence_parallel and ids.shape[1] % self.tp:
            pad = self.tp - ids.shape[1] % self.tp  # sequence parallel splits the sequence over TP ranks
            ids = F.pad(ids, (0, pad))
            pos = F.pad(pos, (0, pad))  # position 0: the padding forms its own sample
            batch = {**batch, "labels": F.pad(batch["labels"], (0, pad), value=IGNORE)}
        labels = shifted_targets(batch["labels"])
        sample = (pos == 0).cumsum(dim=1)
        s = ids.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).tril()
        visible = causal & (sample[:, :, None] == sample[:, None, :])
        return {"input_ids": ids, "position_ids": pos, "attention_mask": ~visible[:, None],
                "labels": labels.clamp(min=0), "loss_mask": (labels != IGNORE).float()}

    def _run_schedule(self, micro_batches: list[dict], num_items: torch.Tensor, forward_only: bool) -> torch.Tensor:
        """Megatron's pipeline schedule over the micro-batches; returns the summed loss on every rank."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = iter([self._mcore_batch(b) for b in micro_batches])

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            with self.autocast():
                output = model(b["input_ids"], b["position_ids"], b["attention_mask"], labels=b["labels"])
            # Under bf16 autocast a stage may emit bf16 hidden states, but the next stage receives
            # into pipeline_dtype (fp32) buffers, raw bytes over p2p: send what it expects.
            per_token = output.to(self.config.pipeline_dtype)

            def loss_func(per_token):
                loss = (per_token.float() * b["loss_mask"]).sum() / num_items
                return loss, b["loss_mask"].sum().int(), {"loss": loss.detach()}

            return per_token, loss_func

        longest = max(b["input_ids"].shape[1] for b in micro_batches)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=self.chunks,
            num_microbatches=len(micro_batches), seq_length=longest,
            micro_batch_size=micro_batches[0]["input_ids"].shape[0], forward_only=forward_only,
        )
        total = torch.zeros((), device=self.dist.device)
        for out in outputs:  # filled on the last pipeline stage only
            total += out["loss"]
        # Every rank needs the loss (for logging and the non-finite check): share it from the last stage.
        dist.all_reduce(total, group=self.mpu.get_pipeline_model_parallel_group())
        return total

    def forward_backward(self, micro_batches: list[dict], num_items: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        from megatron.core import tensor_parallel

        # The pipeline schedule interleaves micro-batches, so the step is seeded once, from its first
        # micro-batch's position: tensor- and pipeline-parallel peers share the data, hence the seed,
        # so they draw the same masks outside their shards; mcore's tracker gives shards per-rank streams.
        torch.manual_seed(seeds[0])
        tensor_parallel.model_parallel_cuda_manual_seed(seeds[0] % 2**31)
        total = self._run_schedule(micro_batches, num_items, forward_only=False)
        self._finalize_grads()
        return self.all_reduce_dp(total) / self.dp_size

    def _finalize_grads(self) -> None:
        """What mcore's DDP wrapper would do: average over data parallel, sum the tied embedding's two
        copies (first and last stage), and sum sequence-parallel norm grads over TP ranks."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.dp_size > 1 and grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.mpu.get_data_parallel_group())
            flat /= self.dp_size
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        if self.pp > 1 and self.layout.tied:
            for chunk in self.chunks:
                weight = chunk.shared_embedding_or_output_weight() if (chunk.pre_process or chunk.post_process) else None
                if weight is not None and weight.grad is not None:
                    dist.all_reduce(weight.grad, group=self.mpu.get_embedding_group())
        if self.config.sequence_parallel:
            for p in self.model.parameters():
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    dist.all_reduce(p.grad, group=self.mpu.get_tensor_model_parallel_group())

    def all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.mpu.get_data_parallel_group())
        return tensor

    @torch.no_grad()
    def forward_loss_sum(self, batch: dict) -> torch.Tensor:
        return self._run_schedule([batch], torch.tensor(1.0, device=self.dist.device), forward_only=True)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over all model-parallel ranks, counting each value once: TP-replicated
        tensors only on TP rank 0, the tied head copy not at all."""
        sq = torch.zeros((), device=self.dist.device)
        for e in self.entries:
            p = e.param
            if p.grad is None or e.pieces[0].replica:
                continue
            if self.tp_rank == 0 or e.pieces[0].axis is not None:
                sq += p.grad.float().pow(2).sum()
        dist.all_reduce(sq, group=self.mpu.get_model_parallel_group())
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    # ---- state --------------------------------------------------------------------------------

    def _saved_entries(self):
        # Frozen base weights are not saved: they come back from the model path on resume.
        return [e for e in self.entries if e.param.requires_grad]

    def _sharded_state(self, tensors_of) -> dict:
        """{key: ShardedTensor} for every trainable piece, keyed by HF name (plus the Adam moments).

        `tensors_of(entry)` gives the pieces' tensors (the parameter's own, a moment's, or empty
        buffers to load into). Replica ids mark the copies that must not be written twice: TP
        ranks holding a whole tensor, data-parallel replicas, the tied head, shared lora_A copies.
        """
        from megatron.core.dist_checkpointing import ShardedTensor

        state = {}
        for e in self._saved_entries():
            for prefix, parts in tensors_of(e).items():
                for piece, t in zip(e.pieces, parts):
                    offsets = [(piece.axis, self.tp_rank, self.tp)] if piece.axis is not None else []
                    replica = (int(piece.replica), self.tp_rank if piece.axis is None else 0, self.dp_rank)
                    key = prefix + piece.name
                    state[key] = ShardedTensor.from_rank_offsets(key, t, *offsets, replica_id=replica)
        return state

    def _moments(self, e, make):
        st = self.optimizer.state[e.param]
        return {f"optim.{m}.": [make(t) for t in self.layout.split(st[m], e.split, len(e.pieces))]
                for m in ("exp_avg", "exp_avg_sq")}

    def save(self, directory: str) -> None:
        from megatron.core import dist_checkpointing

        os.makedirs(directory, exist_ok=True)
        state = self._sharded_state(lambda e: {"": [p.tensor.contiguous() for p in e.pieces],
                                               **self._moments(e, torch.Tensor.contiguous)})
        steps = {float(s["step"]) for s in self.optimizer.state.values()}
        state["optim_step"] = steps.pop() if steps else 0.0  # AdamW steps all parameters together
        dist_checkpointing.save(state, directory)

    def load(self, directory: str, saved) -> None:
        from megatron.core import dist_checkpointing

        for e in self._saved_entries():  # AdamW creates its state lazily; make it to load into
            # The step counter lives beside the parameter: the fused CUDA AdamW wants every state tensor there.
            self.optimizer.state[e.param] = {"step": torch.zeros((), device=e.param.device), "exp_avg": torch.zeros_like(e.param),
                                             "exp_avg_sq": torch.zeros_like(e.param)}
        state = self._sharded_state(lambda e: {"": [torch.empty_like(p.tensor) for p in e.pieces],
                                               **self._moments(e, torch.empty_like)})
        state["optim_step"] = 0.0
        loaded = dist_checkpointing.load(state, directory)
        entries = self._saved_entries()
        self.layout.assign(entries, loaded)
        for m in ("exp_avg", "exp_avg_sq"):
            moments = {k.removeprefix(f"optim.{m}."): v for k, v in loaded.items() if k.startswith(f"optim.{m}.")}
            self.layout.assign(entries, moments, target=lambda e, m=m: self.optimizer.state[e.param][m])
        for e in entries:
            self.optimizer.state[e.param]["step"].fill_(loaded["optim_step"])

    @classmethod
    def load_tensors(cls, directory: str, names: list[str]) -> dict[str, torch.Tensor]:
        # mcore's default "torch_dist" format is DCP underneath, keyed by our (HF) names.
        return read_tensors(directory, {n: n for n in names})

    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """HF-named whole tensors on rank 0: TP shards gathered along their HF axis, then each pipeline
        stage's tensors sent to rank 0."""
        mine = {}
        for e in self.entries:
            if trainable_only and not e.param.requires_grad:
                continue
            for p in e.pieces:
                if p.replica:
                    continue
                t = p.tensor.contiguous()
                if p.axis is not None and self.tp > 1:
                    parts = [torch.empty_like(t) for _ in range(self.tp)]
                    dist.all_gather(parts, t, group=self.mpu.get_tensor_model_parallel_group())
                    t = torch.cat(parts, dim=p.axis)
                mine[p.name] = t.detach().cpu().clone()
        if self.tp_rank != 0 or self.dp_rank != 0:
            return {}
        stages = [None] * self.pp
        dist.all_gather_object(stages, mine, group=self.mpu.get_pipeline_model_parallel_group())
        return {k: v for stage in stages for k, v in stage.items()} if self.dist.is_main else {}

    def save_hf(self, directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """A peft adapter for the HF model (LoRA) or an HF model dir (full), from full_state_dict()."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.cfg.model.train_type == "full":
            self.hf_cfg.save_pretrained(directory)
            save_file(state_dict, str(directory / "model.safetensors"), metadata={"format": "pt"})
            return
        from peft import LoraConfig

        m = self.cfg.model
        LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                   target_modules=self.lora_targets, task_type="CAUSAL_LM",
                   base_model_name_or_path=m.model).save_pretrained(str(directory))
        save_file({k.replace(".default.", "."): v for k, v in state_dict.items()},
                  str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
