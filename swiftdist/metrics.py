"""Where metrics go: a rank-0 progress bar and log lines, metrics.jsonl, wandb, a loss plot.

Only rank 0 constructs a real sink; other ranks get a no-op, so the loop never checks the rank.
"""

from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path

import torch

log = logging.getLogger("swiftdist")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def record_samples(output_dir: Path, rank: int, step: int, epoch: int, sample_ids: list[list[int]]) -> None:
    """Append the sample ids a rank trains on at `step` to its samples-rank{R}.jsonl (--log-samples)."""
    with open(Path(output_dir) / f"samples-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "epoch": epoch, "samples": sample_ids}) + "\n")


class Metrics:
    def __init__(self, output_dir: str, report_to: list[str], total_steps: int, initial_step: int,
                 wandb_project: str, wandb_mode: str, run_config: dict, run_id: str, enabled: bool):
        self.enabled = enabled
        self.history: list[dict] = []
        if not enabled:
            return
        from tqdm import tqdm

        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.output_dir / "metrics.jsonl", "a") if "jsonl" in report_to else None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                        disable=not os.isatty(2))
        self.wandb = None
        if "wandb" in report_to:
            import wandb

            # Offline by default: runs never hang on a network; `wandb sync` uploads later. The id is
            # kept in the checkpoint, so a resumed run continues the same wandb run.
            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(self.output_dir),
                                    config=run_config, id=run_id, resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        if self.bar.disable:
            log.info(text)
        else:
            self.bar.write(text)

    def log_held_bytes(self, step: int, held: dict[str, dict[str, int]]) -> None:
        """What rank 0 holds of parameters and optimizer state, per device type (shows sharding and offload)."""
        self.log({"step": step, **{f"{kind}_mib_{device}": n / 2**20
                                   for kind, devices in held.items() for device, n in devices.items()}})

    def advance(self, steps: int = 1, **postfix) -> None:
        if self.enabled:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()})

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()
        if plot:
            self._plot()

    def _plot(self) -> None:
        """loss.png of the whole run, earlier starts included: drawn from metrics.jsonl, where a step
        logged again after a resume (or a rollback) replaces its earlier record."""
        path = self.output_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.exists() else self.history
        # Records past this run's last step belong to a line abandoned by a rollback.
        last = max((r["step"] for r in self.history), default=None)
        records = [r for r in records if last is None or r["step"] <= last]
        train = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
        evals = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
        if not train:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.output_dir / "loss.png", dpi=100)
        plt.close(fig)
