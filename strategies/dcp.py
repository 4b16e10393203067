"""Checkpointing shared by the torch-native strategies (DDP, FSDP2) through Distributed Checkpoint.

DCP stores each rank's shards plus global metadata and reshards on load, so a checkpoint written
by 2 ranks loads on 1 or 3, and one written under FSDP loads under DDP (the state-dict helpers
strip the wrappers' prefixes, so keys are the plain model's).
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from swiftdist.errors import SwiftdistError
from swiftdist.strategies.base import Strategy
from swiftdist.vocab_parallel import whole_weights


class DCPStrategy(Strategy):
    checkpoint_format = "dcp"
    # Frozen base weights are not saved: they come back from the model path on resume, which keeps
    # LoRA checkpoints a few MB instead of the whole model.
    _options = StateDictOptions(ignore_frozen_params=True)

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options)
        # ignore_frozen_params misses a tied alias (lm_head.weight of a tied-embedding model), which
        # would put the whole frozen embedding into every LoRA checkpoint: drop aliases of frozen tensors too.
        frozen = {n for n, p in self.unwrapped().named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {"model": {k: v for k, v in model_sd.items() if k not in frozen}, "optim": optim_sd}

    def save(self, directory: str) -> None:
        dcp.save(self._state(), checkpoint_id=directory)

    def load(self, directory: str, saved) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=directory)
        # Not strict: the frozen base is absent on purpose, and dcp.load has already failed on any
        # requested (trainable) key the checkpoint lacks.
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )

    @classmethod
    def load_tensors(cls, directory: str, names: list[str]) -> dict[str, torch.Tensor]:
        return read_tensors(directory, {n: f"model.{n}" for n in names})

    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(self.model, options=options)
        if not trainable_only:
            state.update(whole_weights(self.unwrapped()))
        return state if self.dist.is_main else {}


def read_tensors(directory: str, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """Whole tensors {name: tensor} stored under `keys[name]` in a DCP checkpoint, with no process
    group (also reads megatron-core's "torch_dist" checkpoints, which are DCP underneath)."""
    reader = dcp.FileSystemReader(directory)
    saved = reader.read_metadata().state_dict_metadata
    missing = [n for n, k in keys.items() if k not in saved]
    if missing:
        raise SwiftdistError(f"{directory}: the checkpoint has no tensor '{missing[0]}' "
                             f"({len(missing)} missing); was it trained from another base model?")
    # DCP fills preallocated tensors, resharding from however many ranks wrote them.
    state = {k: torch.empty(saved[k].size, dtype=saved[k].properties.dtype) for k in keys.values()}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {n: state[k] for n, k in keys.items()}
