"""DeepSpeed ZeRO: stage 2 shards gradients and optimizer state, stage 3 the parameters too.

`-offload` keeps the optimizer state and its fp32 master weights (and for ZeRO-3 the parameters)
in host memory and runs the optimizer step there. The DeepSpeed config is generated from ours;
`--deepspeed-config FILE` supplies a user's own, checked against our flags before any model loads.

How the trainer's verbs map onto the engine:
- gradient accumulation: the engine is told which micro-batch ends the step
  (`set_gradient_accumulation_boundary`), so it reduces gradients once, on the last one;
- the loss is already the global token mean, so `engine.backward` must not divide it by the
  accumulation steps again (`scale_wrt_gas=False`);
- clipping happens inside `engine.step()` (config `gradient_clipping`); `clip_grad_norm` only
  reads the norm the ZeRO optimizer will clip with, so the trainer can stop on a non-finite one
  before the update;
- bf16 is torch autocast over the module as it loaded (DeepSpeed's `torch_autocast` mode), as
  under ddp and fsdp: fully trained weights stay fp32, gradients accumulate and reduce in fp32.
  DeepSpeed's own `bf16` mode (bf16 weights and a pure-bf16 forward) learned visibly differently
  from DDP on full fine-tuning; docs/deepspeed-cpu.md has the figures.
Checkpoints are DeepSpeed's own format (`save_checkpoint`), frozen weights excluded.

Loading under ZeRO-3: the model is built on the meta device (no weight read), and wrap() gives each
parameter its partition, then fills it from the rows of the safetensors tensor that cover this
rank's range (swiftdist/sharded_load.py plans where every value comes from, LoRA's random init
included). A rank never holds more than its partitions and one tensor's rows in flight. Models whose
files cannot be read that way load under `zero.Init` (transformers); QLoRA loads whole on the host,
where bitsandbytes quantizes it, and is partitioned one parameter at a time on the device.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock

from swiftdist.checkpoint import fsync_tree
from swiftdist.errors import SwiftdistError
from swiftdist.host_memory import return_large_blocks_to_the_os
from swiftdist.model import weight_dtype
from swiftdist.sharded_load import InitialValues, load_empty
from swiftdist.strategies.base import Strategy, build_optimizer, param_groups
from swiftdist.vocab_parallel import kept_rows, shard_embeddings, whole_weights

log = logging.getLogger("swiftdist")

# Keys of a user's DeepSpeed JSON that must agree with our flags ("auto" means: take ours).
_MUST_MATCH = {
    "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "train_batch_size": "--batch-size x --grad-accum x ranks",
    "gradient_clipping": "--max-grad-norm",
}


class ZeroStrategy(Strategy):
    name = "zero2"
    # The stage is part of the format: a ZeRO-2 checkpoint's optimizer partitions are not ZeRO-3's.
    checkpoint_format = "deepspeed-zero2"
    owned_flags = {"deepspeed_config": "--deepspeed-config configures DeepSpeed; use it with a zero2/zero3 strategy, "
                                       "or drop it"}
    stage = 2
    offload = False
    _TAG = "zero"  # one checkpoint per directory, so a fixed tag
    _initial: InitialValues | None = None
    """ZeRO-3, set by build_model when the model is empty (meta): what wrap() fills each rank's partitions with."""

    def __init__(self, cfg, dist, precision):
        super().__init__(cfg, dist, precision)
        self.ds_config = self._config()

    # ---- config ---------------------------------------------------------------------------------

    def _generated(self) -> dict:
        t, on_gpu = self.cfg.train, self.dist.device.type == "cuda"
        zero = {"stage": self.stage, "contiguous_gradients": True, "overlap_comm": on_gpu}
        if self.offload:
            # Pinned host memory speeds up device<->host copies, and exists only with an accelerator.
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
            if self.stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
        return {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * self.dist.world_size,
            "gradient_clipping": max(t.max_grad_norm, 0.0),
            # bf16 is torch autocast over the weights as loaded (fp32 when fully trained), as under
            # ddp and fsdp; not DeepSpeed's `bf16` mode, which casts the module to bf16. An empty
            # module list keeps every gradient reduction (and ZeRO-3 gather) in the weights' dtype.
            "bf16": {"enabled": False},
            "torch_autocast": {"enabled": self.precision == "bf16", "dtype": "bfloat16",
                               "lower_precision_safe_modules": []},
            "zero_optimization": zero,
            # Our AdamW (same update as the other strategies) is not one DeepSpeed lists as tested.
            "zero_allow_untested_optimizer": True,
            # Offload on a CPU host steps torch's AdamW, which already runs where the state lives
            # (DeepSpeed would otherwise insist on its CPU Adam; on CUDA hosts we give it that).
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,  # our trainer logs; keep DeepSpeed's progress lines out
        }

    def _config(self) -> dict:
        ours = self._generated()
        path = self.cfg.parallel.deepspeed_config
        if not path:
            return ours
        user = _read_json(path)
        for key, flag in _MUST_MATCH.items():
            value = user.get(key, "auto")
            if value != "auto" and value != ours[key]:
                raise SwiftdistError(f"--deepspeed-config {path}: {key} is {value!r} but {flag} gives {ours[key]!r}; "
                                     f"set it to \"auto\" or change {flag}")
            user[key] = ours[key]
        if user.get("fp16", {}).get("enabled") not in (None, False, "auto"):
            raise SwiftdistError(f"--deepspeed-config {path}: fp16 is not supported (no loss scaling here); "
                                 "remove the fp16 section and use --precision bf16")
        bf16 = user.setdefault("bf16", {}).get("enabled", "auto")
        if bf16 != "auto" and bool(bf16) != (self.precision == "bf16"):
            raise SwiftdistError(f"--deepspeed-config {path}: bf16.enabled is {bf16} but --precision is "
                                 f"{self.precision}; make them agree (or set it to \"auto\")")
        # "auto": our torch autocast; an explicit true keeps DeepSpeed's bf16 mode, the user's choice.
        user["bf16"]["enabled"] = bf16 is True
        if not user["bf16"]["enabled"]:
            user.setdefault("torch_autocast", ours["torch_autocast"])
        if "scheduler" in user:
            raise SwiftdistError(f"--deepspeed-config {path}: remove the 'scheduler' section; swiftdist sets the "
                                 "learning rate every step (--lr, --scheduler, --warmup-ratio)")
        zero = user.setdefault("zero_optimization", {})
        stage = zero.get("stage", self.stage)
        offloads = bool(zero.get("offload_optimizer", {}).get("device", "none") != "none"
                        or zero.get("offload_param", {}).get("device", "none") != "none")
        if stage != self.stage or offloads != self.offload:
            want = f"zero{stage}" + ("-offload" if offloads else "")
            raise SwiftdistError(f"--deepspeed-config {path}: it asks for ZeRO stage {stage}"
                                 f"{' with' if offloads else ' without'} offload, which is --strategy {want}, "
                                 f"not {self.name}")
        for key, value in ours["zero_optimization"].items():
            zero.setdefault(key, value)
        for key in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print"):
            user.setdefault(key, ours[key])
        return user

    def _fill_model_sizes(self, hidden_size: int) -> None:
        """Bucket sizes from the model width, as the HF Trainer's "auto" values do."""
        zero = self.ds_config["zero_optimization"]
        zero.setdefault("reduce_bucket_size", hidden_size * hidden_size)
        if self.stage == 3:
            prefetch = int(0.9 * hidden_size * hidden_size)
            zero.setdefault("stage3_prefetch_bucket_size", prefetch)
            # Tensors below this stay whole on every rank (norms, biases): cheap, and saves a gather.
            zero.setdefault("stage3_param_persistence_threshold", 10 * hidden_size)
            # From the second step on (once DeepSpeed has traced the module order) a gathered
            # parameter stays whole while its next use is within this many parameters (default
            # 1e9, most of a 1B model from its forward to its backward). Within one prefetch bucket
            # only the LM head stays gathered from its forward to its backward. The cost, on GPU
            # too: the last layers are gathered again for their backward (prefetched there).
            zero.setdefault("stage3_max_reuse_distance", prefetch)

    # ---- building -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def model_init_context(self):
        """ZeRO-3 loading whole (files it cannot slice): transformers builds the model under `zero.Init`,
        so each rank only ever holds its partition. It does so while an HfDeepSpeedConfig is alive.
        Not where from_pretrained is given a device (ZeRO-2; QLoRA, which transformers never builds
        under zero.Init): transformers refuses a device_map with it."""
        if self.load_device() is not None:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hf_config = HfDeepSpeedConfig(self._init_config())  # noqa: F841 -- registered globally by weakref
        try:
            yield
        finally:
            unset_hf_deepspeed_config()

    def _init_config(self) -> dict:
        """The config zero.Init sees. zero.Init casts every weight it builds to the dtype its config
        names (bf16 or fp16 when enabled, else fp32): name the dtype the weights load in, so that
        LoRA's frozen bf16 base stays bf16 and a full fine-tune's weights stay fp32 under autocast."""
        if self.ds_config["bf16"]["enabled"]:  # DeepSpeed's bf16 mode (a user's choice): bf16 weights
            return self.ds_config
        dtype = weight_dtype(self.cfg.model, self.precision)
        init = {k: v for k, v in self.ds_config.items() if k != "torch_autocast"}
        return {**init, "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}

    def build_model(self, path, attn_impl: str | None = None):
        import deepspeed
        from transformers import AutoConfig

        # DeepSpeed's collectives wrap our process group; zero.Init needs them to know the world size,
        # and reads the local device from LOCAL_RANK, which a plain `python` process has not set.
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        self._fill_model_sizes(AutoConfig.from_pretrained(path).hidden_size)
        if self.stage == 3:
            if self.dist.device.type == "cpu":
                return_large_blocks_to_the_os()
            why = _cannot_fill_partitions(self.ds_config)
            if why:
                log.warning("--strategy %s: %s; every rank loads the whole model instead", self.name, why)
            elif built := load_empty(self.cfg.model, path, self.precision, attn_impl, self.name):
                model, self._initial = built
                return model
        return super().build_model(path, attn_impl)

    def wrap(self, model) -> None:
        import deepspeed

        if self.stage == 3:
            # A frozen embedding and LM head keep their rows on each rank instead of partitions gathered
            # whole at every step (swiftdist/vocab_parallel.py); offloaded, they are partitioned as any weight.
            if not self.offload:
                shard_embeddings(model, torch.distributed.group.WORLD, self.dist.device, self._initial)
            self._partition(model)
            self._bound_live_parameters(model)
        optimizer = None if "optimizer" in self.ds_config else self._client_optimizer(model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                          dist_init_required=False)
        self.model, self.optimizer = engine, engine.optimizer

    def close(self) -> None:
        """Let go of every process group DeepSpeed keeps, so destroy_process_group() really ends them.

        A gloo group still referenced keeps its threads running into the interpreter's teardown, when
        a rank of tests/multiproc/test_zero3_load.py was seen to abort ("terminate called without an
        active exception", about 1 run in 7). DeepSpeed 0.19.8 holds two (and TorchBackend.barrier's
        default argument the default group, which swiftdist.distributed.destroy releases): the
        engine's module stays in ZeRO-3's global forward stack (and with it the engine and the group
        its parameters name), and its clone of the world group is cached."""
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.utils import groups

        if self.model is not None:
            self.model.destroy()  # the optimizer's and offload's hooks
            stack = parameter_offload.FWD_MODULE_STACK
            stack[:] = [m for m in stack if m is not self.model.module]
            self.model = self.optimizer = None  # the engine's cycles hold groups too: let gc have them
        if groups._WORLD_GROUP is not None:
            torch.distributed.destroy_process_group(groups._WORLD_GROUP)
            groups._WORLD_GROUP = None

    def _partition(self, model) -> None:
        """ZeRO-3: give every parameter that has none yet its partition, one parameter at a time, as
        deepspeed.initialize would (it would first move the whole model to the device); then fill the
        partitions of an empty model from the files.

        An empty (meta) parameter gets a placeholder of its full size that nothing writes: DeepSpeed
        cuts this rank's range from it (host pages never touched stay unallocated; a GPU holds one
        such at a time) and InitialValues.fill overwrites that range. A loaded one (QLoRA, LoRA
        adapters added after zero.Init) moves to the device and is cut there. No broadcast from rank 0
        (zero.Init's): every rank read the same files and drew LoRA's init from the same seed.
        """
        from deepspeed.runtime.zero.partition_parameters import Init, is_zero_param

        init = Init(config_dict_or_path=self._init_config())  # not entered: only its conversion is used
        for param in model.parameters():
            if is_zero_param(param):  # built under zero.Init
                continue
            if param.is_meta:  # in place (a meta tensor's data cannot be set): tied names keep one parameter
                placeholder = torch.empty(param.shape, dtype=param.dtype, device=init.local_device)
                torch.utils.swap_tensors(param, torch.nn.Parameter(placeholder, requires_grad=param.requires_grad))
            else:
                param.data = param.data.to(init.local_device)
            init._convert_to_deepspeed_param(param)
            param.partition()
        place_non_parameters(model, init.local_device)
        if init.mem_efficient_linear:
            # What zero.Init leaves behind (and deepspeed.initialize, partitioning a model itself):
            # F.linear saving the weight parameter for backward, which gathers it again. Torch's
            # saves a view of the gathered weight, which kept every layer gathered until backward.
            init._enable_mem_efficient_linear()
        if self._initial is not None:
            self._initial.fill(model)
            self._initial = None

    def _bound_live_parameters(self, model) -> None:
        """ZeRO-3 prefetches the parameters of the modules to come, on every module's fetch, until
        `stage3_max_live_parameters` are gathered (default 1e9: 3.7 GB in fp32). From the second step
        on (the first traces the module order) a 1.07B LoRA model, fp32, 2 ranks, held 3.6 GiB
        gathered per rank through the forward: peak 7.0-7.5 GiB against DDP's 5.0. Two of the
        largest decoder layers: the one computing and the next one prefetched, what the memory
        estimate counts (on GPU as much prefetch as overlaps one layer's compute)."""
        from swiftdist.strategies.fsdp import decoder_layers

        zero = self.ds_config["zero_optimization"]
        if "stage3_max_live_parameters" in zero:
            return
        try:
            layers = decoder_layers(model)
        except SwiftdistError:  # no layer class named: DeepSpeed's default
            return
        numel = max(sum(getattr(p, "ds_numel", p.numel()) for p in layer.parameters()) for layer in layers)
        zero["stage3_max_live_parameters"] = 2 * numel

    def _client_optimizer(self, model) -> torch.optim.Optimizer:
        if self.offload and self.dist.device.type == "cuda":
            # The step runs on the host: DeepSpeed's vectorised CPU Adam is several times faster
            # there than torch's. (On a CPU host torch's AdamW is used, and no extension is built.)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            t = self.cfg.train
            return DeepSpeedCPUAdam(param_groups(model, self.cfg, self.param_shape), lr=t.lr,
                                    betas=(t.adam_beta1, t.adam_beta2), adamw_mode=True)
        return build_optimizer(model, self.cfg, self.param_shape)

    @staticmethod
    def param_shape(p):
        # A parameter partitioned by ZeRO-3 is an empty placeholder; ds_shape keeps its real shape.
        return getattr(p, "ds_shape", p.shape)

    # ---- one optimizer step ---------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self, is_last_micro_batch: bool):
        self.model.set_gradient_accumulation_boundary(is_last_micro_batch)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        # engine.step() clips, by config["gradient_clipping"] (which _config() ties to --max-grad-norm).
        opt = self.optimizer
        if self.stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm = combine_grad_norm_groups(opt._get_norm_groups())
        else:
            norm = opt.scaled_global_norm()
        norm = torch.as_tensor(norm, dtype=torch.float32).cpu() / opt.loss_scale
        # DeepSpeed reports an inf/NaN norm as -1; give the trainer a non-finite value it recognises.
        return torch.where(norm < 0, torch.tensor(float("nan")), norm)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.step()  # clips, updates, zeroes the gradients

    # ---- state ----------------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        self.model.save_checkpoint(directory, tag=self._TAG, exclude_frozen_parameters=True)

    def load(self, directory: str, saved) -> None:
        tag = self._TAG
        if saved.dp_size != self.dp_size:
            # DeepSpeed reads its own format only on the world size that wrote it. Its universal
            # format (one fp32 file per parameter and optimizer state) loads on any world size.
            tag = self._universal(directory)
            self.model._config.load_universal_checkpoint = True
        # Not strict: the frozen base weights were left out of the checkpoint on purpose.
        self.model.load_checkpoint(directory, tag=tag, load_module_strict=False, load_lr_scheduler_states=False)

    def _universal(self, directory: str) -> str:
        """Convert the checkpoint to DeepSpeed's universal format once (kept beside it for later
        resumes); its tag. Rank 0 converts while the other ranks wait on a gloo group of their own,
        whose timeout allows for a 70B checkpoint (the default group's would run out first)."""
        tag = f"{self._TAG}_universal"
        waiting = torch.distributed.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
        failure = [None]
        if self.dist.is_main:
            try:
                convert_to_universal(Path(directory) / self._TAG, Path(directory) / tag)
            except SwiftdistError as e:
                failure = [str(e)]
        torch.distributed.broadcast_object_list(failure, src=0, group=waiting)
        torch.distributed.destroy_process_group(waiting)
        if failure[0]:
            raise SwiftdistError(failure[0])
        return tag

    @classmethod
    def load_tensors(cls, directory: str, names: list[str]) -> dict[str, torch.Tensor]:
        # DeepSpeed's own consolidation of the fp32 master weights (ZeRO-2 and ZeRO-3 alike); lazy
        # mode reads a tensor's partitions only when it is asked for, so export memory stays bounded.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(directory, tag=cls._TAG, lazy_mode=True)
        return {n: lazy[n].contiguous() for n in names}

    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.unwrapped().named_parameters():
            if p.requires_grad:
                # The fp32 master copy, not the bf16 weight the forward uses. Collective.
                tensor = safe_get_full_fp32_param(p)
            elif trainable_only:
                continue
            elif hasattr(p, "ds_id"):  # a ZeRO-3 partition: gather it (collective)
                with deepspeed.zero.GatheredParameters([p]):
                    tensor = p.data.clone()
            else:
                tensor = p.data
            if self.dist.is_main:
                out[name] = tensor.detach().cpu()
        if not trainable_only:
            out.update(whole_weights(self.unwrapped(), every_name=False))
        return out if self.dist.is_main else {}

    def _state_tensors(self) -> dict[str, list[torch.Tensor]]:
        # ZeRO-3 keeps each parameter's partition in ds_tensor. The ZeRO optimizer holds the fp32
        # master partitions (attribute named per stage) and steps a torch optimizer on them.
        params = [getattr(p, "ds_tensor", p) for p in self.model.module.parameters()] + kept_rows(self.model.module)
        opt = self.optimizer
        masters = list(getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups)
        moments = [t for state in opt.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return {"params": params, "optimizer": masters + moments}

    @classmethod
    def memory_estimate(cls, stats, world_size: int) -> dict[str, float]:
        # The module keeps the dtype it loaded in (bf16 runs under autocast, as under ddp). The ZeRO
        # optimizer partitions fp32 gradients, an fp32 master copy of the trainable weights and
        # Adam's two fp32 moments. (ZeRO-3 means to reuse fp32 weight partitions as the master copy,
        # but DeepSpeed 0.19.8's check compares a torch.device with a device name and never matches.)
        trainable = stats.n_trainable / world_size
        parts = {
            "params": stats.loaded_bytes / (world_size if cls.stage == 3 else 1),
            "grads": 4 * trainable,
            "optimizer": 12 * trainable,
        }
        buffers = stats.hidden_size**2 * 4  # the fp32 gradient reduce bucket
        if cls.stage == 3:  # the layer being computed and the prefetched one, gathered in their own dtype
            frozen = stats.layer_params - stats.layer_trainable
            buffers += 2 * (frozen * stats.weight_bytes + stats.layer_trainable * stats.trainable_bytes)
        host = 0.0
        if cls.offload:
            moved = ("grads", "optimizer", "params") if cls.stage == 3 else ("grads", "optimizer")
            host = sum(parts[k] for k in moved)
            parts.update({k: 0 for k in moved})
        return {**parts, "buffers": buffers, "host": host}


class Zero2OffloadStrategy(ZeroStrategy):
    name = "zero2-offload"
    offload = True


class Zero3Strategy(ZeroStrategy):
    name = "zero3"
    checkpoint_format = "deepspeed-zero3"
    stage = 3

    def load_device(self) -> torch.device | None:
        # A model loaded whole (files it cannot slice) is placed and partitioned by zero.Init as it is
        # built. Not a 4-bit one (transformers skips zero.Init for it, and without a device_map
        # bitsandbytes would put it whole on the current GPU of every rank): it is quantized on the
        # host, and wrap() moves it to the device one parameter at a time, partitioning as it goes.
        return torch.device("cpu") if self.cfg.model.train_type == "qlora" else None


class Zero3OffloadStrategy(Zero3Strategy):
    name = "zero3-offload"
    offload = True


# How long the other ranks wait for a universal conversion. It reads and rewrites every fp32 master
# weight and Adam moment, 12 bytes per trained parameter (840 GB for a 70B full fine-tune, plus the
# module's weights under ZeRO-2): ~4.5 hours at the 70 MB/s measured on 2 cores here
# (docs/deepspeed-cpu.md). If rank 0 dies instead, torchrun ends the others at once.
CONVERSION_TIMEOUT = datetime.timedelta(hours=12)


def convert_to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal from `src` into `out`, once however many jobs ask at the same time.

    Under an exclusive lock (fcntl), it converts into a partial folder beside the checkpoint, and
    renames the result to `out` once complete: a crash leaves nothing inside the checkpoint, and the
    next conversion removes the partial folder. It runs in a child process, with parallel workers.
    """
    import psutil  # a DeepSpeed dependency

    src, out = src.resolve(), out.resolve()  # `latest/...` and `step-N/...` lock the same file
    checkpoint = out.parent.parent  # step-N/ (out is step-N/model/zero_universal)
    prefix = f".{checkpoint.name}.{out.name}.partial-"
    with FileLock(str(out) + ".lock"):
        if out.is_dir():
            return  # another job converted it while this one waited
        for stale in checkpoint.parent.glob(prefix + "*"):  # a conversion that crashed
            shutil.rmtree(stale, ignore_errors=True)
        # Its own folder, so that a crashed conversion's orphaned child cannot write into this one.
        partial = Path(tempfile.mkdtemp(prefix=prefix, dir=checkpoint.parent))
        # An extract worker loads one rank's optimizer file; a merge worker every rank's slices of
        # one parameter, which is no larger. Room for two of each in the memory free now.
        largest = max((f.stat().st_size for f in src.glob("*optim_states.pt")), default=1)
        fit = max(1, psutil.virtual_memory().available // (2 * largest))
        workers = str(min(len(os.sched_getaffinity(0)), fit))
        # A subfolder: ds_to_universal also writes a `latest_universal` file beside its output.
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(partial / out.name), "--num_extract_workers", workers,
               "--num_merge_workers", workers,
               "--inject_missing_state"]  # ZeRO-2 checkpoints lack some of what the format wants
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SwiftdistError(f"converting {src} to a universal checkpoint failed (exit {proc.returncode}): {last}")
        fsync_tree(partial)
        os.replace(partial / out.name, out)
        folder = os.open(out.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        shutil.rmtree(partial)
        log.info("converted %s to a universal checkpoint in %.1f s (%s workers)", src, time.monotonic() - started,
                 workers)


def place_non_parameters(model: torch.nn.Module, device: torch.device | str) -> None:
    """Move what is no parameter to `device`: buffers (rotary tables), and bitsandbytes' quantization
    state (absmax and codes, attributes of a 4-bit weight). DeepSpeed moves parameters only, and its
    engine moves nothing of a model it finds partitioned."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.to(device)  # in place


def _cannot_fill_partitions(config: dict) -> str | None:
    """Why this DeepSpeed config (a user's) keeps ZeRO-3 from filling each partition from the files
    (Zero3Strategy._partition), or None."""
    zero = config["zero_optimization"]
    if config["bf16"]["enabled"]:
        return "DeepSpeed's bf16 mode (--deepspeed-config) has zero.Init build every weight in bf16"
    if zero.get("offload_param", {}).get("device") == "nvme":
        return "parameters offloaded to NVMe leave for disk as they are partitioned"
    if zero.get("zero_hpz_partition_size", 1) > 1 or zero.get("zero_quantized_weights") \
            or zero.get("zero_quantized_nontrainable_weights"):
        return "hpZ and quantized weights derive more from a partition than the partition itself"
    return None


def _read_json(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SwiftdistError(f"--deepspeed-config {path}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SwiftdistError(f"--deepspeed-config {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise SwiftdistError(f"--deepspeed-config {path}: expected a JSON object")
    return data
