"""The output directory of a training run, its checkpoints, and stopping on a signal without losing work.

- prepare_output_dir checks (and writes nothing); claim_output_dir, just before the first write, creates
  the directory, replaces a previous run (--overwrite_output_dir), deletes what killed writes left
  (LEFTOVERS) and on --resume cuts log.jsonl back to the checkpoint's step.
- disk_errors: a failed write (disk full, read-only, I/O error) becomes one line naming the path.
- log.jsonl: read_log / append_log. The run's history lives there, not in memory or in checkpoints.
- take_output_dir / release_output_dir: one run per directory (an flock on OUTPUT_DIR/.lock that the
  OS drops when its holder dies); prepare_output_dir refuses early while another run holds it.
- checkpoint_step_N/ = model/ (LoRA: adapters/) + optimizer.safetensors and optimizer.json (optimizer, scheduler and RNG
  states: tensors, and the JSON that names them) + trainer_state.json (written last): save_checkpoint,
  checkpoint_dirs, find_resume_checkpoint, read_trainer_state, check_same_run, restore_training_state
  (every read bounded, every bad file one line). Nothing in a checkpoint is pickle, so loading one
  cannot run code. The data order is a pure function of seed and step, so a resumed run is exact.
- SignalStop: Ctrl-C / SIGTERM finish the step, checkpoint and print a resume line; a second Ctrl-C
  raises ForcedStop at once, and forced_stop says what is left on disk.
Every write goes through fileio: under a temporary name, renamed into place when complete.
"""
import dataclasses
import errno
import fcntl
import json
import math
import os
import random
import re
import shlex
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from support.distributed import any_process, is_main_process
from support.errors import UserError, check_writable
from support.fileio import atomic_dir, read_bounded, remove, write_json, write_text_atomic
from support.lora import save_adapters

RUN_FILES = re.compile(r"^(checkpoint_step_\d+|best_model_step_\d+|final_model|final_adapters|evaluation_report\.json|"
                       r"train_config\.json|log\.jsonl)$")

# What a killed write leaves behind: temporary siblings of the files above (fileio's atomic writes, the
# write probe). Never complete, never read; removed when the next run starts.
LEFTOVERS = re.compile(r"^\.(checkpoint_step_\d+|best_model_step_\d+|final_model|final_adapters|evaluation_report\.json|"
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
    if (out / LOCK).is_file() and str(out.resolve()) not in _held:  # opened, not created: writes nothing
        os.close(lock_output_dir(out, os.open(out / LOCK, os.O_RDONLY)))
    ours = run_files(out)
    if "final_model" in ours and not resume and not overwrite:
        raise UserError(f"--output_dir {out} holds a finished run (final_model/ is there); pass "
                        "--overwrite_output_dir to train it again, or choose another --output_dir")
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
        take_output_dir(out)
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


# One run per directory: the run holds an flock on OUTPUT_DIR/.lock from its first write until it ends. The
# OS drops the lock when the holder's process dies (SIGKILL too), so a dead run never leaves it locked;
# the file itself stays (deleting it would race with a run opening it) and means nothing unlocked.
LOCK = ".lock"
_held: dict[str, int] = {}  # this process's locks (a second train() in one process reuses its own)


def lock_output_dir(out: Path, fd: int) -> int:
    """flock `fd` (open on out/.lock) or refuse in one line naming the holder; returns `fd`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise UserError(f"--output_dir {out} is in use by another train.py run (process {holder or '?'}); "
                        "wait for it to end, or choose another --output_dir") from None
    return fd


def take_output_dir(out: Path):
    """Lock `out` for this run (rank 0 only), and write our process id into the lock file for the message."""
    key = str(out.resolve())
    if key not in _held:
        fd = lock_output_dir(out, os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = fd


def release_output_dir(out: Path):
    fd = _held.pop(str(out.resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor drops the lock


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
            if (out / "final_model").is_dir():
                raise UserError(f"--resume: the run in {out} is complete (final_model/ is there), there is "
                                "nothing to continue; pass --overwrite_output_dir to train it again, or "
                                "choose another --output_dir")
            if run_files(out):  # a run that stopped before its first checkpoint: nothing to continue
                raise UserError(f"--resume: {out} holds a run but no complete checkpoint to resume from "
                                f"(it stopped before its first one); start it again with --overwrite_output_dir")
            raise UserError(f"--resume: no checkpoint in {out} to resume from; start without --resume")
        path = ckpts[-1]
    else:
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"--resume {path} is not a checkpoint directory (no trainer_state.json); "
                            f"pass a checkpoint_step_N directory or --resume latest")
    if (path / "optimizer.pt").exists():
        raise UserError(f"--resume: {path} holds optimizer.pt, a pickle file (an older train.py wrote it), and "
                        "loading pickle can run arbitrary code, so it is not read; start the run again with "
                        "--overwrite_output_dir or in a new --output_dir")
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


# ---- the training state without pickle: tensors in safetensors, everything else in JSON ---------------
# Optimizer (AdamW, bitsandbytes AdamW8bit), scheduler and RNG states are nests of dicts, lists, tuples,
# numbers, strings, tensors and numpy arrays. flatten_state puts every tensor (and array) into a flat
# {name: tensor} dict for optimizer.safetensors and leaves a JSON tree that names them (optimizer.json);
# unflatten_state reverses it. Neither format can run code when read, unlike torch.save's pickle.
TENSOR, ARRAY, TUPLE, INT_KEYS = "__tensor__", "__ndarray__", "__tuple__", "__int_keys__"


def flatten_state(obj, tensors: dict, path: str = "s", seen: dict | None = None):
    seen = {} if seen is None else seen  # a tensor met twice (bnb shares its quantisation maps) is stored once
    if torch.is_tensor(obj):
        key = (obj.device, obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride())
        if key not in seen:
            seen[key] = path
            tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR: seen[key]}
    if isinstance(obj, np.ndarray):  # numpy's RNG key is uint32, which safetensors lacks
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj).contiguous()
        return {ARRAY: path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {TUPLE: [flatten_state(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{path}.{i}", seen) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, tensors, f"{path}.{k}", seen) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            return {INT_KEYS: {str(k): flatten_state(v, tensors, f"{path}.{k}", seen) for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} without pickle")


def unflatten_state(tree, tensors: dict):
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if TENSOR in tree:
        return tensors[tree[TENSOR]]
    if ARRAY in tree:
        return tensors[tree[ARRAY]].numpy().astype(np.dtype(tree["dtype"]))
    if TUPLE in tree:
        return tuple(unflatten_state(v, tensors) for v in tree[TUPLE])
    if INT_KEYS in tree:
        return {int(k): unflatten_state(v, tensors) for k, v in tree[INT_KEYS].items()}
    return {k: unflatten_state(v, tensors) for k, v in tree.items()}


def save_checkpoint(out: Path, step: int, model, optimizer_state: dict, scheduler, trainer_state: dict,
                    save_total_limit: int) -> Path:
    """checkpoint_step_N/: model/ (a loadable reward model; under LoRA adapters/, the adapters and the head
    with the base model's fingerprint), optimizer.safetensors + optimizer.json,
    trainer_state.json (last); then only the newest `save_total_limit` checkpoints are kept (bounded disk)."""
    from safetensors.torch import save_file
    final = out / f"checkpoint_step_{step}"
    tensors = {}
    tree = flatten_state({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_states()},
                         tensors)
    with disk_errors(final):
        with atomic_dir(final) as tmp:
            if getattr(model, "lora_config", None):  # LoRA: adapters and head only; the base is not copied
                save_adapters(model, tmp / "adapters")
            else:
                model.save_pretrained(tmp / "model")
            save_file(tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "optimizer.json", tree)
            write_json(tmp / "trainer_state.json", trainer_state)
        for old in checkpoint_dirs(out)[:-save_total_limit]:
            remove(old)
    return final


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, checked to hold what train.py writes there."""
    try:
        state = json.loads(read_bounded(path / "trainer_state.json", 2**20))
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and all(
                isinstance(state.get(k), int) and state[k] >= 0 for k in ("step", "step_batch"))
                and isinstance(state.get("best_accuracy"), (int, float))):
            raise ValueError("not the fields train.py writes")
    except Exception as e:  # empty, cut short, not JSON, too deep, other fields: never a traceback
        raise unreadable(path / "trainer_state.json", e) from None
    return state


def restore_training_state(path: Path, optimizer, scheduler, load_optimizer_state):
    """Put the optimizer, scheduler and RNG states saved in `path` back, read without pickle. What is read
    is bounded first by what `optimizer` can hold: the JSON's size, and the number and bytes of the tensors
    (from the safetensors header, before any data; Adam keeps two moments per parameter)."""
    from safetensors.torch import load_file
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_tensors, max_bytes = 8 * len(params) + 64, 8 * sum(p.numel() for p in params) + 2**14 * len(params) + 2**20
    name = "optimizer.safetensors"
    try:
        with open(path / name, "rb") as f:
            header = json.loads(f.read(min(int.from_bytes(f.read(8), "little"), 2**26)))
        spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        if len(spans) > max_tensors or sum(end - start for start, end in spans) > max_bytes:
            raise ValueError(f"{len(spans)} tensors, more than this model's optimizer state holds")
        tensors = load_file(path / name)
        name = "optimizer.json"
        saved = unflatten_state(json.loads(read_bounded(path / name, 2**20 + 2**12 * len(params))), tensors)
        if not (isinstance(saved, dict) and saved.keys() == {"optimizer", "scheduler", "rng"}
                and saved["scheduler"].keys() == scheduler.state_dict().keys()):
            raise ValueError("not the fields train.py writes")
        name = "optimizer.safetensors and optimizer.json"  # they hold another model's state, or are corrupt
        load_optimizer_state(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_states(saved["rng"])
    except Exception as e:
        raise unreadable(path / name, e) from None


def unreadable(file: Path, e: Exception) -> UserError:
    """One line for a checkpoint file that is missing, corrupt or truncated."""
    what = "is missing" if isinstance(e, FileNotFoundError) else \
        f"is corrupt or truncated ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    return UserError(f"--resume: {file} {what}; resume from another checkpoint_step_N with --resume PATH, "
                     "or start again with --overwrite_output_dir")


# What a resume does with each TrainConfig field (docs/guarantees.md, "What --resume may change").
# SAME_RUN: what makes it the same run: the model, the training pairs and their order, the held-out pairs
# (the best model is picked on them), the optimizer's kind. Another value is refused in one line.
SAME_RUN = ("model", "from_scratch", "head", "pooling", "dataset", "eval_split", "eval_dataset", "eval_fraction",
            "max_train_samples", "max_eval_samples", "max_length", "seed", "freeze_layers", "model_8bit",
            "optim_8bit", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "chat_template")
# MAY_CHANGE: honoured from the resumed step on and recorded in train_config.json. The schedule
# (learning_rate, num_epochs, max_steps, warmup_ratio: each later step gets the new schedule's rate),
# the update (weight_decay, max_grad_norm, center_rewards_coefficient), how the same pairs per step are
# computed (batch_size x gradient_accumulation_steps x processes must stay the same), the bookkeeping.
MAY_CHANGE = ("learning_rate", "num_epochs", "max_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
              "center_rewards_coefficient", "batch_size", "gradient_accumulation_steps", "bf16",
              "gradient_checkpointing", "compile", "packing", "share_prompt", "fsdp", "eval_steps", "save_steps",
              "save_total_limit", "logging_steps", "output_dir", "overwrite_output_dir", "resume", "device",
              "use_wandb", "wandb_project", "progress", "save_adapters")


def check_same_run(saved: dict, cfg, step_batch: int):
    """Resuming with another SAME_RUN setting, or other pairs per step, would not continue the same run: refuse."""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}  # a key older checkpoints lack
    diff = [f"{k} ({saved['config'].get(k, default[k])!r} -> {getattr(cfg, k)!r})" for k in SAME_RUN
            if saved["config"].get(k, default[k]) != getattr(cfg, k)]
    # The data order depends on the pairs per optimizer step, not on how they are split: another number
    # of processes or accumulation steps is fine as long as batch_size x accumulation x processes matches.
    if saved["step_batch"] != step_batch:
        diff.append(f"pairs per step, batch_size x gradient_accumulation_steps x processes "
                    f"({saved['step_batch']} -> {step_batch})")
    if diff:
        raise UserError(f"--resume: the checkpoint was trained with other settings: {', '.join(diff)}; "
                        "resume with the same flags, or start a new --output_dir")


def check_same_data(saved: dict | None, now: dict):
    """Other training pairs than the checkpoint's (another count or content) are refused: the data order
    would not continue. A data file that changed (size, time) while the pairs read stay the same, e.g.
    touched or grown beyond --max_train_samples, is a one-line warning. `saved` is None for checkpoints
    written before the data was recorded."""
    if saved is None:
        return
    changed = [f"{f} ({file_change(saved['files'].get(f), now['files'].get(f))})"
               for f in sorted({**saved["files"], **now["files"]}) if saved["files"].get(f) != now["files"].get(f)]
    if saved["train_pairs"] != now["train_pairs"] or saved["train_digest"] != now["train_digest"]:
        content = ", other content" if saved["train_pairs"] == now["train_pairs"] else ""
        files = f"; changed: {', '.join(changed)}" if changed else ""
        raise UserError(f"--resume: the training data changed since the run started ({saved['train_pairs']} -> "
                        f"{now['train_pairs']} pairs{content}{files}), so the data order would not continue; "
                        "restore the data, or start a new --output_dir")
    if changed and is_main_process():
        print(f"warning: --resume: data file(s) changed since the run started: {', '.join(changed)}; the "
              "training pairs read are the same, so the run continues", file=sys.stderr)


def file_change(old: list | None, new: list | None) -> str:
    """How a data file's [size, mtime] changed, in words."""
    if old is None or new is None:
        return "new" if old is None else "gone"
    return f"size {old[0]} -> {new[0]} bytes" if old[0] != new[0] else "modified"


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
