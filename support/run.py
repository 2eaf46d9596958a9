"""A training run's plumbing around train.py's loop (a run context): the output directory, resuming,
checkpoints, the best model, logging (W&B, TensorBoard), and the end of the run. With one process, every collective here
is a plain passthrough; under torchrun, rank 0 writes and every process hears of its failures.

    run = Run(cfg, device)          # torchrun; the output directory checked (nothing written); --resume found
    run.check_resume(...)           # before any weights load: another run's checkpoint is refused by name
    step = run.start(cfg, ...)      # resumed states; the directory claimed, train_config.json; trackers
    run.log(record) / run.save(step) / run.evaluate_and_keep_best(step, evaluate) / run.finish(...)

- check_resume, resume_training, resume_weights: what --resume refuses (checkpoint.SAME_RUN, the pairs per
  step, the training pairs read) and how it continues (optimizer, schedule and RNG states; what may change,
  checkpoint.MAY_CHANGE, applies from the resumed step on).
- stop_if_not_finite: a NaN or inf loss or gradient ends the run in one line naming the last good checkpoint.
- use_one_thread_if_tiny: the demo's tiny model runs on one CPU thread.

It reads train.TrainConfig's fields by name and never imports train.py.
"""
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from support import checkpoint, distributed, export, lora, scoring, weights
from support.distributed import is_main_process, print0
from support.errors import UserError
from support.fileio import remove, write_json_atomic
from support.metrics import init_trackers, log_record


class Run:
    """One run of train.py: where it writes, what it resumes from, and what it has kept so far (the best
    held-out accuracy). Every process makes one; rank 0 writes."""
    def __init__(self, cfg, device: torch.device):
        """torchrun's process group; the output directory checked (and probed) by rank 0, every process
        hearing of a failure; the --resume checkpoint found. Nothing is written yet."""
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.rank, self.world, self.device = distributed.setup_distributed(device)
        with distributed.rank_0_errors(self.device):
            if self.rank == 0:
                checkpoint.prepare_output_dir(self.out, resume=bool(cfg.resume), overwrite=cfg.overwrite_output_dir)
        self.resume_from = checkpoint.find_resume_checkpoint(cfg.resume, self.out) if cfg.resume else None

    def check_resume(self, cfg, step_batch: int, total_steps: int, data_read: dict):
        """On --resume: refuse a checkpoint of another run, or one with no step left to train."""
        if self.resume_from is not None:
            checkpoint.check_finished_run(self.out, total_steps)  # a finished run: only trained further
            check_resume(self.resume_from, cfg, step_batch, total_steps, data_read)

    def start(self, cfg, model, train_model, optimizer, scheduler, total_steps: int, step_batch: int,
              data_read: dict) -> int:
        """The run begins: a line on the model (the parameters that train); on --resume the saved optimizer,
        schedule and RNG states come back; then the first write into the output directory (every input has
        been checked by now), and the trackers (W&B, TensorBoard). `cfg` is the configuration as the run
        records it. Returns the first step to train."""
        self.cfg, self.model, self.train_model, self.optimizer, self.scheduler = \
            cfg, model, train_model, optimizer, scheduler
        self.total_steps, self.step_batch, self.data_read = total_steps, step_batch, data_read
        step, self.best_accuracy = 0, -1.0
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f"model: {cfg.model} | head {model.head_type}, pooling {model.pooling} | {n_trainable / 1e6:.2f}M of "
               f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters train | device {self.device}, "
               f"{self.world} process(es)")
        if self.resume_from is not None:
            step, self.best_accuracy, changed = resume_training(self.resume_from, cfg, optimizer, scheduler,
                                                                train_model)
            print0(f"resumed from {self.resume_from} at step {step}/{total_steps}" +
                   (f"; changed since the checkpoint: {', '.join(changed)}" if changed else "") +
                   ("; final_model/ is replaced when this run ends" if (self.out / "final_model").is_dir() else ""))
        with distributed.rank_0_errors(self.device):
            if self.rank == 0:
                checkpoint.claim_output_dir(self.out, replace_previous_run=cfg.overwrite_output_dir and not cfg.resume,
                                            resume_step=step if self.resume_from is not None else None)
                with checkpoint.disk_errors(self.out / "train_config.json"):
                    removed = data_read.get("removed")  # --dedup, --decontaminate: counts, beside the settings
                    write_json_atomic(self.out / "train_config.json",
                                      {**asdict(cfg), **({"removed": removed} if removed else {})})
        self.trackers = init_trackers(cfg, self.out, asdict(cfg), step if self.resume_from is not None else None)
        return step

    def log(self, record: dict, line: str | None = None):
        log_record(self.out, record, self.trackers, line)

    def log_eval(self, step: int, report: dict):
        record = {"step": step, "eval_accuracy": report["accuracy"], "eval_loss": report["loss"],
                  "eval_margin": report["margin"]["mean"]}
        self.log(record, f"eval step {step}: accuracy {record['eval_accuracy']:.4f} | "
                         f"loss {record['eval_loss']:.4f} | margin {record['eval_margin']:.4f}")

    def full_model(self):
        """The whole model on rank 0 (under FSDP a copy holding the gathered weights), None on the other
        processes. A collective: every process calls it."""
        full = distributed.gather_model_state(self.train_model, self.cfg.fsdp)
        return distributed.unsharded(self.model, full) if is_main_process() else None

    def keep_best(self, model, step: int, accuracy: float):
        """best_model_step_N/: the best held-out accuracy so far (rank 0)."""
        if accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            best = self.out / f"best_model_step_{step}"
            with checkpoint.disk_errors(best):  # the new best first, then the old one goes: never none
                model.save_pretrained(best)
                for old in self.out.glob("best_model_step_*"):
                    if old.name != best.name:
                        remove(old)

    def evaluate_and_keep_best(self, step: int, evaluate) -> dict | None:
        """`evaluate(model)` on rank 0 (under FSDP every process gathers the weights first), logged, and the
        best model so far kept as best_model_step_N/. The report (None on other ranks)."""
        current, report = self.full_model(), None
        with distributed.rank_0_errors(self.device):  # e.g. a full disk while saving the best model ends every process
            if current is not None:
                report = evaluate(current)
                self.log_eval(step, report)
                self.keep_best(current, step, report["accuracy"])
        return report

    def save(self, step: int) -> Path:
        """checkpoint_step_N/: every process gathers its shards (under FSDP), rank 0 writes. No history in a
        checkpoint: it lives in log.jsonl, so a checkpoint's size does not grow with the step."""
        trainer_state = {"step": step, "best_accuracy": self.best_accuracy, "config": asdict(self.cfg),
                         "total_steps": self.total_steps, "step_batch": self.step_batch, "world_size": self.world,
                         "data": self.data_read}
        full = distributed.gather_model_state(self.train_model, self.cfg.fsdp)
        optimizer_state = distributed.gather_optimizer_state(self.optimizer, self.train_model, self.cfg.fsdp)
        with distributed.rank_0_errors(self.device):  # e.g. a full disk on rank 0 ends every process
            if is_main_process():
                checkpoint.save_checkpoint(self.out, step, distributed.unsharded(self.model, full), optimizer_state,
                                           self.scheduler, trainer_state, self.cfg.save_total_limit)
        return self.out / f"checkpoint_step_{step}"

    def stop_if_not_finite(self, what: str, value: float, step: int, before_update: bool = False):
        stop_if_not_finite(what, value, step, self.out, before_update)

    def forced_stop(self, step: int, first_signal: str) -> checkpoint.ForcedStop:
        return checkpoint.forced_stop(self.out, step, self.total_steps, first_signal)

    def release(self):
        checkpoint.release_output_dir(self.out)  # the next run may take the directory (rank 0 holds it)

    def finish(self, step: int, held_out, report: dict | None, evaluate) -> dict:
        """final_model/ (LoRA: merged into plain weights), final_adapters/ with --save_adapters, and the final
        evaluation_report.json (rank 0: `report` when the last step was just evaluated, the same weights,
        else `evaluate(model)`), then every process leaves together. Returns step, output_dir, final_model,
        eval_accuracy, report and history (all of log.jsonl, resumed parts included)."""
        out, cfg = self.out, self.cfg
        result = {"step": step, "output_dir": str(out), "final_model": str(out / "final_model")}
        final_model = self.full_model()
        if final_model is None:  # another process: rank 0 writes
            report = None
        else:
            with checkpoint.disk_errors(out / "final_model"):
                final_model.save_pretrained(out / "final_model")
            if cfg.save_adapters:  # PEFT's layout where transformers has the model, else ours (said in one line)
                with checkpoint.disk_errors(out / "final_adapters"):
                    print0(lora.export_adapters(self.model, out / "final_adapters"))
            report = (report if report is not None else evaluate(final_model)) if held_out.items else None
        if report is not None:
            removed = self.data_read.get("removed")  # --dedup, --decontaminate: what the training data lost
            report.update(checkpoint=str(out / "final_model"), dataset=held_out.sources, split=cfg.eval_split,
                          eval_fraction=cfg.eval_fraction, max_length=cfg.max_length,
                          max_samples=cfg.max_eval_samples, **({"removed": removed} if removed else {}))
            with checkpoint.disk_errors(out / "evaluation_report.json"):  # reward mean/std for normalize=True
                report["reward_stats"] = scoring.save_reward_stats(out / "final_model", report)
                write_json_atomic(out / "evaluation_report.json", report)
            result.update(eval_accuracy=report["accuracy"], report=str(out / "evaluation_report.json"))
            print0(f"final: eval accuracy {report['accuracy']:.4f} on {report['num_pairs']} pairs | "
                   f"model saved to {out / 'final_model'}")
        elif final_model is not None:
            print0(f"final: model saved to {out / 'final_model'} (no evaluation: --eval_split none)")
        for tracker in self.trackers:  # W&B, TensorBoard
            tracker.finish()
        # Not under rank_0_errors: one more collective right before destroy_process_group let gloo abort at exit
        # now and then (1 run in 18 under load); a failure here ends rank 0, and torchrun then stops the others.
        distributed.end_distributed(self.world)
        result["history"] = checkpoint.read_log(out) if is_main_process() else []  # resumed parts included
        return result


# ---- resume --------------------------------------------------------------------------------------


def check_resume(path: Path, cfg, step_batch: int, total_steps: int, data_read: dict):
    """Refuse a resume that would not continue the run of the checkpoint at `path` (checkpoint.SAME_RUN,
    the pairs per step, the training pairs read), or that has no step left to train."""
    state = checkpoint.read_trainer_state(path)
    checkpoint.check_same_run(state, cfg, step_batch)
    checkpoint.check_same_data(state.get("data"), data_read)
    if total_steps <= state["step"]:
        raise UserError(f"--resume: the checkpoint is at step {state['step']} and this run ends at step "
                        f"{total_steps} (--max_steps/--num_epochs); ask for more steps, or use its model as it is")


def resume_training(path: Path, cfg, optimizer, scheduler, train_model):
    """Continue the run where the checkpoint at `path` left it: optimizer, schedule and RNG states. What may
    change on a resume (checkpoint.MAY_CHANGE) takes effect from here: the peak learning rate and the weight
    decay replace the saved ones, and the learning rate follows this run's schedule (a changed
    --learning_rate, --max_steps, --num_epochs or --warmup_ratio), from the first resumed step on.
    Returns (step, best held-out accuracy so far, the changes as "name old -> new")."""
    state = checkpoint.read_trainer_state(path)
    checkpoint.restore_training_state(path, optimizer, scheduler, lambda saved: distributed.load_optimizer_state(
        optimizer, train_model, saved, cfg.fsdp))
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    for group, base_lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base_lr, base_lr * f(scheduler.last_epoch)  # as LambdaLR computes it
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # matrices; norms and biases stay at 0
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    changed = [f"{k} {state['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in checkpoint.MAY_CHANGE
               if k not in ("resume", "output_dir") and state["config"].get(k) != getattr(cfg, k)]
    return state["step"], state["best_accuracy"], changed


def resume_weights(model, cfg, path: Path, fingerprint: str | None):
    """A full checkpoint's weights go into `model`; a LoRA checkpoint's adapters are returned, to load once
    add_lora has made their places, after checking they belong to this base model."""
    if (path / "adapters").is_dir() != (cfg.lora_rank is not None):
        raise UserError(f"--resume: {path} was trained with{'' if (path / 'adapters').is_dir() else 'out'} "
                        f"LoRA; resume with the same --lora_* flags it was trained with")
    if cfg.lora_rank is not None:
        config, adapters = lora.read_adapters(path / "adapters")
        lora.check_base(config, fingerprint, path)
        return adapters
    weights.load_weights(model, path / "model", torch.float32, export.module_name)
    return None


# ---- what the loop calls -------------------------------------------------------------------------


def stop_if_not_finite(what: str, value: float, step: int, out: Path, before_update: bool = False):
    """A NaN or inf ends the run with one line naming the step and the last good checkpoint."""
    if not math.isfinite(value):
        last = checkpoint.checkpoint_dirs(out)
        when = " before the update." if before_update else "."
        advice = (f"Last good checkpoint: {last[-1]}. Resume from it with a lower learning rate (the same flags "
                  f"and --resume {last[-1]} --learning_rate LOWER: it applies from there on), or check the data"
                  if last else "Last good checkpoint: none. Start again with a lower --learning_rate and "
                               "--overwrite_output_dir, or check the data")
        raise UserError(f"the {what} became {value} at step {step}; training stopped{when} {advice}")


TINY_MODEL_PARAMS = 2_000_000  # non-embedding parameters; the demo has 0.1M, the "small" config 25M


def use_one_thread_if_tiny(model):
    """Run a tiny model (the demo) on one CPU thread. Its matrices are too small to split between threads,
    so a second thread mostly waits; with another busy process on the machine, that waiting made the demo
    several times slower (BENCHMARKS.md, "The demo on a busy machine"). OMP_NUM_THREADS, if set, wins."""
    if "OMP_NUM_THREADS" not in os.environ and model.model.num_params() < TINY_MODEL_PARAMS:
        torch.set_num_threads(1)

