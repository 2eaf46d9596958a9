"""What a training run logs: each step's metrics, their average since the last log line, the record that
goes to log.jsonl, W&B, TensorBoard and the console.

- StepMetrics: one optimizer step's loss, accuracy and margin (averaged over its pairs, every process's
  included) and its tokens (summed over processes).
- StepSums: the step's metrics summed as its micro-batches come (each weighted as its loss is), then over
  the processes: what makes them those of one big batch, out of train.py's loop.
- MetricsSinceLastLog: the steps since the last log line, averaged into the next record (numbers to six
  significant digits, so that 1.16e-5 stays 1.16e-5; the learning rate too).
- peak_memory_gib: the peak memory of the device (CUDA) or the process (CPU); tools/bench.py uses it too.
- init_trackers: where records go besides log.jsonl (rank 0): W&B, TensorBoard (--report_to).
- log_record: a record to log.jsonl (rank 0) and the trackers, and a line to the console.
"""
import time
from pathlib import Path
from typing import NamedTuple

import torch

from support import checkpoint, distributed
from support.distributed import is_main_process, print0


class StepMetrics(NamedTuple):
    """One optimizer step's metrics: loss, accuracy and margin weighted by each micro-batch's share of the
    step's pairs, tokens summed over processes."""
    loss: float
    accuracy: float
    margin: float
    tokens: float


class StepSums:
    """One optimizer step's metrics, added up over its micro-batches: loss, accuracy and margin each times
    the micro-batch's weight (its share of the step's pairs or groups, times the processes: train.StepBatches),
    so they average over the step's pairs as the gradient does; tokens times the processes, and none from a
    stand-in micro-batch (weight 0). over_processes() averages the processes' sums (a collective)."""
    def __init__(self, device: torch.device, world: int):
        self.world, self.sums = world, torch.zeros(len(StepMetrics._fields), device=device)

    def add(self, losses: dict, batch, weight: float):
        """One micro-batch: the loss's dict for it (rm.pairwise_loss, listwise_loss...), its batch, its weight."""
        self.sums += torch.stack([losses["loss"].detach() * weight, losses["accuracy"] * weight,
                                  losses["margin"].detach() * weight, batch.num_tokens() * self.world * (weight > 0)])

    def over_processes(self) -> StepMetrics:
        return StepMetrics(*distributed.all_reduce_mean(self.sums, self.world).tolist())


class MetricsSinceLastLog:
    """The training metrics of the steps since the last log line, averaged into the next one. Made with a
    CUDA device, it starts that device's peak memory afresh (the peak logged is the training loop's)."""
    def __init__(self, device: torch.device | None = None):
        if device is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.reset()

    def reset(self):
        self.loss = self.accuracy = self.margin = 0.0
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()

    def add(self, metrics: StepMetrics):
        """One step's metrics."""
        self.loss, self.accuracy = self.loss + metrics.loss, self.accuracy + metrics.accuracy
        self.margin += metrics.margin
        self.steps += 1
        self.tokens += int(metrics.tokens)

    def record(self, step: int, epoch: float, lr: float, grad_norm, device) -> dict:
        """The log.jsonl record of these steps; the next one starts from here."""
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "epoch": round(epoch, 3), "loss": significant(self.loss / self.steps),
                  "accuracy": round(self.accuracy / self.steps, 5), "margin": significant(self.margin / self.steps),
                  "lr": significant(lr), "grad_norm": round(float(grad_norm), 4),
                  "tokens_per_s": round(self.tokens / elapsed, 1), "peak_mem_gib": round(peak_memory_gib(device), 3)}
        self.reset()
        return record


def significant(x: float, digits: int = 6) -> float:
    """x to `digits` significant digits: a loss of 1.16e-5 stays 1.16e-5 (round(x, 5) would log 1e-5)."""
    return float(f"{x:.{digits}g}")


def peak_memory_gib(device) -> float:
    """CUDA: the peak of allocated tensors. CPU: the process's peak RSS, VmHWM (Linux), which follows a
    reset through /proc/self/clear_refs (tools/bench.py measures each side that way), unlike ru_maxrss."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # also KiB on Linux


REPORT_TO = ("none", "tensorboard", "wandb")  # --report_to, comma-separated


def report_to_names(report_to: str) -> list[str]:
    """--report_to "tensorboard,wandb" -> ["tensorboard", "wandb"]; "none" -> []."""
    return [name for name in (n.strip() for n in report_to.split(",")) if name != "none"]


class TensorBoardLog:
    """--report_to tensorboard: each log.jsonl record's numbers as scalars of the same names at the same step,
    in event files under OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`). On --resume
    the events after the checkpoint's step are purged, as log.jsonl is cut back to it."""
    def __init__(self, log_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict, step: int):
        for name, value in record.items():
            if name != "step" and type(value) in (int, float):  # not None, not a bool
                self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a killed run keeps what was logged

    def finish(self):
        self.writer.close()


def init_trackers(cfg, out: Path, config: dict, resume_step: int | None) -> list:
    """The trackers every record also goes to, on rank 0 only: W&B (--report_to wandb, or --use_wandb) and
    TensorBoard. Each has log(record, step=) and finish()."""
    names = report_to_names(cfg.report_to)
    if not is_main_process():
        return []
    trackers = []
    if "wandb" in names or cfg.use_wandb:
        import wandb
        trackers.append(wandb.init(project=cfg.wandb_project, config=config))
    if "tensorboard" in names:
        trackers.append(TensorBoardLog(out / "tensorboard", resume_step))
    return trackers


def log_record(out: Path, record: dict, trackers: list, line: str | None = None):
    """A record to log.jsonl and the trackers, and a line to the console (rank 0 only)."""
    if is_main_process():
        with checkpoint.disk_errors(out / "log.jsonl"):
            checkpoint.append_log(out, record)
    for tracker in trackers:
        tracker.log(record, step=record["step"])
    print0(line or " | ".join(f"{k} {v}" for k, v in record.items()))
