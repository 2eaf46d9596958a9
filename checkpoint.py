"""The output directory of a training run, its checkpoints, and stopping on a signal without losing work.

- prepare_output_dir checks (and writes nothing); claim_output_dir, just before the first write, creates
  the directory, replaces a previous run (--overwrite_output_dir), deletes what killed writes left
  (LEFTOVERS) and on --resume cuts log.jsonl back to the checkpoint's step.
- disk_errors: a failed write (disk full, read-only, I/O error) becomes one line naming the path.
- log.jsonl: read_log / append_log. The run's history lives there, not in memory or in checkpoints.
- checkpoint_step_N/ = model/ + optimizer.pt (optimizer, scheduler and RNG states) + trainer_state.json
  (written last): save_checkpoint, checkpoint_dirs, find_resume_checkpoint, load_checkpoint,
  check_same_run. The data order is a pure function of seed and step, so a resumed run is exact.
- SignalStop: Ctrl-C / SIGTERM finish the step, checkpoint and print a resume line; a second Ctrl-C
  raises ForcedStop at once, and forced_stop says what is left on disk.
Every write goes through fileio: under a temporary name, renamed into place when complete.
"""
import errno
import json
import math
import random
import re
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from distributed import any_process, is_main_process
from errors import UserError, check_writable
from fileio import atomic_dir, remove, write_json, write_text_atomic

RUN_FILES = re.compile(r"^(checkpoint_step_\d+|best_model_step_\d+|final_model|evaluation_report\.json|"
                       r"train_config\.json|log\.jsonl)$")

# What a killed write leaves behind: temporary siblings of the files above (fileio's atomic writes, the
# write probe). Never complete, never read; removed when the next run starts.
LEFTOVERS = re.compile(r"^\.(checkpoint_step_\d+|best_model_step_\d+|final_model|evaluation_report\.json|"
                       r"train_config\.json|log\.jsonl)\.(tmp|old)-|^\.write-test-\d+$")


# ---- the output directory ------------------------------------------------------------------------


def run_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if RUN_FILES.match(p.name)) if out.is_dir() else []


def prepare_output_dir(out: Path, resume: bool, overwrite: bool):
    """Refuse to mix two runs in one directory; make sure we can write there before training starts.
    Only checks: the directory is left as it was found (created, cleaned, replaced by claim_output_dir
    once the data and the model have loaded), so a run that fails on bad input writes nothing."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; pass a directory")
    ours = run_files(out)
    if ours and not resume and not overwrite:
        raise UserError(f"--output_dir {out} already holds another run ({', '.join(ours[:3])}); "
                        "pass --resume to continue it, --overwrite_output_dir to replace it, "
                        "or choose another --output_dir")
    check_writable(out, f"to --output_dir {out}", "choose a writable directory")


def claim_output_dir(out: Path, replace_previous_run: bool, resume_step: int | None):
    """Just before the first write: create the directory, replace a previous run, delete what killed
    writes left behind, and on resume cut log.jsonl back to the checkpoint's step (the steps after it
    are trained, and logged, again; a line cut by a kill goes too)."""
    with disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        if replace_previous_run:
            for name in run_files(out):
                remove(out / name)
        for p in out.iterdir():
            if LEFTOVERS.match(p.name):
                remove(p)
        if resume_step is not None and (out / "log.jsonl").is_file():
            kept = [json.dumps(r) + "\n" for r in read_log(out)
                    if isinstance(r, dict) and r.get("step", math.inf) <= resume_step]
            write_text_atomic(out / "log.jsonl", "".join(kept))


def disk_error_message(e: BaseException, path) -> str | None:
    """One line for a failed write, or None if `e` is not one. A full disk shows up as OSError(ENOSPC),
    as safetensors' "No space left on device (os error 28)", or as torch.save's RuntimeError whose
    context is the OSError of the file object it wrote to."""
    chain, seen = e, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT) or \
                "No space left on device" in str(chain) or "os error 28" in str(chain):
            return f"no space left on device while writing {path}; free space or choose another --output_dir"
        if isinstance(chain, OSError):
            return (f"cannot write {path} ({chain.strerror or chain}); check the disk and the permissions of "
                    "--output_dir, or choose another --output_dir")
        chain = chain.__cause__ or chain.__context__
    return None


class disk_errors:
    """`with disk_errors(path):` turns a failed write (disk full, read-only, I/O error) into a one-line
    UserError naming `path`. The writers inside are atomic, so what was there before stays intact."""
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not isinstance(e, Exception) or isinstance(e, UserError):
            return False
        message = disk_error_message(e, self.path)
        if message is None:
            return False
        raise UserError(message) from None


# ---- log.jsonl -----------------------------------------------------------------------------------


def read_log(out: Path) -> list[dict]:
    """The records of log.jsonl; a line cut short by a kill is skipped."""
    records = []
    if (out / "log.jsonl").is_file():
        for line in (out / "log.jsonl").read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def append_log(out: Path, record: dict):
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ---- checkpoints ---------------------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json is written last), oldest first. Temporary directories of
    a killed write (.checkpoint_step_N.tmp-PID) never count."""
    found = [p for p in out.glob("checkpoint_step_*") if re.fullmatch(r"checkpoint_step_\d+", p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("_", 1)[1]))


def find_resume_checkpoint(resume: str, out: Path) -> Path:
    """--resume alone or --resume latest: the newest complete checkpoint in `out`; else the given one."""
    if resume == "latest":
        ckpts = checkpoint_dirs(out)
        if not ckpts:
            if run_files(out):  # a run that stopped before its first checkpoint: nothing to continue
                raise UserError(f"--resume: {out} holds a run but no complete checkpoint to resume from "
                                f"(it stopped before its first one); start it again with --overwrite_output_dir")
            raise UserError(f"--resume: no checkpoint in {out} to resume from; start without --resume")
        return ckpts[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {path} is not a checkpoint directory (no trainer_state.json); "
                        f"pass a checkpoint_step_N directory or --resume latest")
    return path


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer_state: dict, scheduler, trainer_state: dict,
                    save_total_limit: int) -> Path:
    """checkpoint_step_N/: model/ (a loadable reward model), optimizer.pt, trainer_state.json (last);
    then only the newest `save_total_limit` checkpoints are kept (bounded disk)."""
    final = out / f"checkpoint_step_{step}"
    with disk_errors(final):
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp / "model")
            with open(tmp / "optimizer.pt", "wb") as f:  # a file object: a full disk surfaces as OSError(ENOSPC)
                torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                            "rng": rng_states()}, f)
            write_json(tmp / "trainer_state.json", trainer_state)
        for old in checkpoint_dirs(out)[:-save_total_limit]:
            remove(old)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(trainer_state.json, optimizer.pt's {"optimizer", "scheduler", "rng"}) of a checkpoint."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    return state, saved


def check_same_run(saved: dict, cfg, step_batch: int):
    """Resuming with other data or batch settings would not continue the same run: refuse."""
    keys = ("model", "dataset", "max_train_samples", "max_length", "seed", "head", "pooling", "freeze_layers",
            "model_8bit", "optim_8bit")
    diff = [f"{k} ({saved['config'].get(k)!r} -> {getattr(cfg, k)!r})" for k in keys
            if saved["config"].get(k) != getattr(cfg, k)]
    # The data order depends on the pairs per optimizer step, not on how they are split: another number
    # of processes or accumulation steps is fine as long as batch_size x accumulation x processes matches.
    if saved["step_batch"] != step_batch:
        diff.append(f"pairs per step, batch_size x gradient_accumulation_steps x processes "
                    f"({saved['step_batch']} -> {step_batch})")
    if diff:
        raise UserError(f"--resume: the checkpoint was trained with other settings: {', '.join(diff)}; "
                        "resume with the same flags, or start a new --output_dir")


# ---- stopping on a signal ------------------------------------------------------------------------


class ForcedStop(KeyboardInterrupt):
    """A second Ctrl-C while the first one's checkpoint is pending: stop at once, without that checkpoint.
    The message (rank 0's; empty on the others) says what is on disk."""


class SignalStop:
    """`with SignalStop() as stop:` Ctrl-C / SIGTERM set `stop.signal` (its name); the loop finishes the
    step in flight, checkpoints and exits with a resume line. A second Ctrl-C means "now": ForcedStop is
    raised wherever the loop is, abandoning that checkpoint. Safe even mid-write: checkpoints are written
    under a hidden temporary name (removed on the way out) and renamed into place only when complete.
    The previous handlers are put back on the way out."""
    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise ForcedStop()
        self.signal = signal.Signals(signum).name

    def requested(self, world: int, device) -> bool:
        """Whether to stop after this step; under torchrun every process stops at the same step (saving a
        checkpoint is collective), so one process's signal stops them all."""
        if world > 1 and any_process(self.signal is not None, device):
            self.signal = self.signal or "SIGTERM"
        return self.signal is not None


def resume_command(checkpoint: Path) -> str:
    return f"python train.py {shlex.join(resume_args(sys.argv[1:]))} --resume {shlex.quote(str(checkpoint))}"


def resume_args(argv: list[str]) -> list[str]:
    """The command line without a previous --resume, so the printed resume command is clean."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            if not a.startswith("-"):
                continue
        if a == "--resume":  # its value is optional: the next word is it only if it is not a flag
            skip = True
            continue
        if not a.startswith("--resume="):
            args.append(a)
    return args


def stopped_message(signal_name: str, checkpoint: Path, step: int, total_steps: int) -> str:
    return (f"\n{signal_name} received: saved {checkpoint} at step {step}/{total_steps}. Resume with:\n"
            f"  {resume_command(checkpoint)}")


def forced_stop_message(out: Path, step: int, total_steps: int, first: str = "SIGINT") -> str:
    """What a Ctrl-C during a pending stop (`first`: the signal that asked for it) leaves: the newest
    complete checkpoint (a write it cut short never counts)."""
    ckpts = checkpoint_dirs(out)
    head = ("second SIGINT (Ctrl-C)" if first == "SIGINT" else f"SIGINT (Ctrl-C) after {first}") + \
        f": stopped at once after step {step}/{total_steps}"
    abandoned = "without the checkpoint the first one asked for" if first == "SIGINT" else \
        f"without the checkpoint {first} asked for"
    if not ckpts:
        return (f"{head}, {abandoned}; no checkpoint had been saved yet, so "
                "there is nothing to resume: run again with --overwrite_output_dir")
    last = ckpts[-1]
    done = "its checkpoint was complete" if last.name == f"checkpoint_step_{step}" else abandoned
    return f"{head}, {done}; the last saved checkpoint {last} is intact. Resume with: {resume_command(last)}"


def forced_stop(out: Path, step: int, total_steps: int, first: str) -> ForcedStop:
    """The ForcedStop to raise: rank 0 says what is on disk, the other processes stay silent."""
    return ForcedStop(forced_stop_message(out, step, total_steps, first) if is_main_process() else "")
