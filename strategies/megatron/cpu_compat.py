"""Make megatron-core 0.16 run on CPU + gloo, for the duration of a megatron run.

megatron-core assumes a GPU in a few hard-coded places. Each patch below replaces one of them
with its CPU equivalent; none changes what the library computes. `patched()` applies them only
when CUDA is absent (the GPU path runs the library unpatched) and puts every original back when
it exits, so the rest of the process (another strategy, `torch.Tensor.cuda`) sees stock torch.
"""

from __future__ import annotations

import contextlib
import types
from unittest import mock

import torch


@contextlib.contextmanager
def patched():
    """megatron-core runs on CPU inside the block (nothing changes where CUDA is present)."""
    if torch.cuda.is_available():
        yield
        return
    patches = [*_cpu_current_device(), *_tensor_cuda_stays_on_cpu(), *_no_op_synchronize(),
               *_cpu_schedule_buffers(), *_cpu_rng_tracker(), *_cpu_autocast_in_linear_backward()]
    with contextlib.ExitStack() as stack:
        # mock.patch.object restores each attribute exactly as it was: a staticmethod as one, and an
        # inherited one (Tensor.cuda lives on TensorBase) by deleting the shadowing copy.
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield


def _cpu_current_device():
    # Buffers throughout mcore (rotary frequencies, pipeline p2p shape and activation buffers,
    # attention scratch) are allocated with `device=torch.cuda.current_device()`, which raises
    # without CUDA. "cpu" is a valid `device=` argument everywhere it is used.
    return [(torch.cuda, "current_device", lambda: "cpu")]


def _tensor_cuda_stays_on_cpu():
    # With tied embeddings and PP > 1, GPTModel moves the head's copy of the embedding with
    # `weight.data.cuda()` before all-reducing it over the embedding group. Without CUDA that call
    # can only raise; leaving the tensor where it is, is what the all-reduce needs on gloo.
    return [(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)]


def _no_op_synchronize():
    # The pipeline p2p shape exchange calls `torch.cuda.synchronize()` after batch_isend_irecv to
    # guard against a CUDA-stream race; gloo ops are complete once `wait()` returns.
    return [(torch.cuda, "synchronize", lambda device=None: None)]


class _TorchWithCpuZeros(types.ModuleType):
    """`torch`, except that `zeros(..., device="cuda")` allocates on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _cpu_schedule_buffers():
    # The pipeline schedules count tokens in `torch.zeros([], device="cuda")` (a literal, so the
    # current_device patch does not reach it). Only the schedules module sees this wrapper.
    from megatron.core.pipeline_parallel import schedules

    return [(schedules, "torch", _TorchWithCpuZeros("torch"))]


def _cpu_rng_tracker():
    # Tensor-parallel regions draw dropout from a tracked "model-parallel" RNG stream that differs
    # per TP rank; the stock tracker stores and swaps *CUDA* generator states. This one does the
    # same with the CPU generator, so seeding and fork() keep their meaning.
    from megatron.core.tensor_parallel import random

    class CpuRNGStatesTracker(random.CudaRNGStatesTracker):
        def add(self, name, seed):
            if seed in self.seeds_ or name in self.states_:
                raise Exception(f"rng state {name} (seed {seed}) already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return [(random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker()),
            (random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)]


def _cpu_autocast_in_linear_backward():
    # mcore's parallel linear autograd Functions are decorated with torch.amp.custom_fwd/custom_bwd
    # for device_type="cuda": backward replays the forward's *CUDA* autocast state. Under CPU bf16
    # autocast the backward then multiplies a bf16 gradient by the fp32 weight and fails. Decorate
    # the same functions for the CPU instead, as the library does for CUDA.
    from megatron.core.tensor_parallel import layers

    return [(fn, verb, staticmethod(decorate(getattr(fn, verb).__wrapped__, device_type="cpu")))
            for fn in (layers.LinearWithFrozenWeight, layers.LinearWithGradAccumulationAndAsyncCommunication)
            for verb, decorate in (("forward", torch.amp.custom_fwd), ("backward", torch.amp.custom_bwd))]
