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
  raises ForcedStop at once, and forced_stop says what is left on disk; exit_if_stopped gives a stopped
  run its exit status.
Every write goes through fileio: under a temporary name, renamed into place when complete.
"""
import dataclasses
import errno
import fcntl
import json
import os
import random
import re
import shlex
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import torch

from support.distributed import any_process, is_main_process
from support.errors import UserError, check_writable
from support.fileio import (NotRegularFile, atomic_dir, file_kind, open_regular, read_bounded, remove, write_json,
                            write_text_atomic)
from support.lora import save_adapters, settings_file

RUN_FILES = re.compile(r"^(checkpoint_step_\d+|best_model_step_\d+|final_model|final_adapters|evaluation_report\.json|"
                       r"train_config\.json|log\.jsonl|tensorboard)$")

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
    if str(out.resolve()) not in _held:  # opened if there, never created: writes nothing
        fd = open_lock(out, create=False)
        if fd is not None:
            os.close(lock_output_dir(out, fd))
    ours = run_files(out)
    if "final_model" in ours and not resume and not overwrite:
        raise UserError(f"--output_dir {out} holds a finished run (final_model/ is there); pass "
                        f"--overwrite_output_dir to train it again, {train_further(out)}, or choose another --output_dir")
    if ours and not resume and not overwrite:
        # One instruction whichever way it is met: --resume says the same of a run with no checkpoint
        advice = "pass --resume to continue it, --overwrite_output_dir to replace it" if checkpoint_dirs(out) else \
            "it stopped before its first checkpoint, so there is nothing to resume: pass --overwrite_output_dir to start it again"
        raise UserError(f"--output_dir {out} already holds another run ({', '.join(ours[:3])}); {advice}, "
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
            kept = [json.dumps(r) + "\n" for r in read_log(out)  # a record without a numeric step goes too
                    if isinstance(r, dict) and type(r.get("step")) in (int, float) and r["step"] <= resume_step]
            write_text_atomic(out / "log.jsonl", "".join(kept))


# One run per directory: the run holds an flock on OUTPUT_DIR/.lock from its first write until it ends. The
# OS drops the lock when the holder's process dies (SIGKILL too), so a dead run never leaves it locked;
# the file itself stays (deleting it would race with a run opening it) and means nothing unlocked.
LOCK = ".lock"
_held: dict[str, int] = {}  # this process's locks (a second train() in one process reuses its own)


def open_lock(out: Path, create: bool) -> int | None:
    """A descriptor on out/.lock (open for writing with `create`, else only to test the flock: that writes
    nothing), or None if there is none and `create` is False. Only a
    regular file is opened, never followed through a link (a .lock linking elsewhere would have that file
    truncated) and never blocking (a FIFO); anything else, or a lock this user cannot open (another
    user's), is refused in one line naming the lock."""
    lock = out / LOCK
    fix = f"remove it (if no train.py uses {out}) or choose another --output_dir"
    try:
        fd = os.open(lock, (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
    except (FileNotFoundError, NotADirectoryError):  # no lock (yet): the probe says if out can be made
        if create:
            raise
        return None
    except OSError as e:  # ELOOP: a symbolic link; EISDIR: a directory; EACCES: another user's lock; ENXIO: a socket
        if os.path.lexists(lock) and not stat.S_ISREG(os.lstat(lock).st_mode):
            raise UserError(f"--output_dir {out}: its lock file {lock} is {lock_kind(os.lstat(lock).st_mode)}, "
                            f"not the file train.py writes there; {fix}") from None
        raise UserError(f"--output_dir {out}: cannot open its lock file {lock} ({e.strerror}): it may belong to "
                        f"another user's run; {fix}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device opens without O_NOFOLLOW's refusal
        kind = lock_kind(os.fstat(fd).st_mode)
        os.close(fd)
        raise UserError(f"--output_dir {out}: its lock file {lock} is {kind}, not the file train.py writes there; "
                        f"{fix}")
    return fd


def lock_kind(mode: int) -> str:
    """What a .lock that is not a regular file is, in words (lstat's mode: a link is named as a link)."""
    return "a symbolic link" if stat.S_ISLNK(mode) else file_kind(mode)


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
        fd = lock_output_dir(out, open_lock(out, create=True))
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
        with open_regular(out / "log.jsonl") as f:
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
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
    if (out / "final_model").is_dir() and not checkpoint_dirs(out):  # with checkpoints: see check_finished_run
        raise UserError(f"--resume: the run in {out} is complete (final_model/ is there) and kept no checkpoint "
                        f"to continue from; {train_further(out)}, pass --overwrite_output_dir to train it again, "
                        "or choose another --output_dir")
    if resume == "latest":
        ckpts = checkpoint_dirs(out)
        if not ckpts:
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


def train_further(out: Path) -> str:
    """How to train a finished run's model further: --resume from its newest checkpoint with more steps
    (check_finished_run), or, with no checkpoint left, a new run that starts from its final model."""
    if checkpoint_dirs(out):
        return "--resume with a larger --max_steps or --num_epochs to train it further"
    return (f"start a new run from its model to train it further (--model {out} and another "
            "--output_dir: a fresh optimizer and schedule)")


def finished_at(out: Path) -> int:
    """The step a finished run's final_model/ was trained to: the last step log.jsonl records (every run logs
    its last step), else the total of the run that wrote the newest checkpoint."""
    steps = [r["step"] for r in read_log(out) if isinstance(r, dict) and type(r.get("step")) is int]
    if steps:
        return max(steps)
    return int(read_trainer_state(checkpoint_dirs(out)[-1]).get("total_steps", 0))


def check_finished_run(out: Path, total_steps: int):
    """--resume of a finished run (final_model/ there) trains it further, as HF Trainer does: from its newest
    checkpoint, on this run's schedule (as for any resume), and the new final_model/ replaces the old one at
    the end. Only to more steps than it has: fewer or as many would train the same steps again."""
    if (out / "final_model").is_dir() and total_steps <= (done := finished_at(out)):
        raise UserError(f"--resume: the run in {out} is complete at step {done} (final_model/ is there) and "
                        f"this run ends at step {total_steps}; pass a larger --max_steps or --num_epochs to train it "
                        "further, --overwrite_output_dir to train it again, or use its model as it is")


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():  # a run moved to fewer GPUs: the ones it has
        for i, state in enumerate(s["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


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


def unflatten_state(tree, tensors: dict, arrays: dict | None = None):
    """The nest flatten_state stored. A tensor named twice is the same object; an array is converted once
    and only to numpy's RNG key dtype, so no reference or dtype in the JSON can make it allocate more than
    optimizer.safetensors holds."""
    arrays = {} if arrays is None else arrays
    if isinstance(tree, list):
        return [unflatten_state(v, tensors, arrays) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if TENSOR in tree:
        return tensors[tree[TENSOR]]
    if ARRAY in tree:
        if tree.get("dtype") != "uint32" or tensors[tree[ARRAY]].dtype != torch.int64:
            raise HandEdited(f"array {tree[ARRAY]!r:.60} of dtype {tree.get('dtype')!r:.30}: only numpy's uint32 "
                             "RNG key is stored as an array")
        if tree[ARRAY] not in arrays:
            key = tensors[tree[ARRAY]]
            if key.numel() and not (0 <= key.min() and key.max() < 2**32):
                raise HandEdited(f"array {tree[ARRAY]!r:.60} holds values outside uint32")
            arrays[tree[ARRAY]] = key.numpy().astype(np.uint32)
        return arrays[tree[ARRAY]]
    if TUPLE in tree:
        return tuple(unflatten_state(v, tensors, arrays) for v in tree[TUPLE])
    if INT_KEYS in tree:
        return {int(k): unflatten_state(v, tensors, arrays) for k, v in tree[INT_KEYS].items()}
    return {k: unflatten_state(v, tensors, arrays) for k, v in tree.items()}


def save_checkpoint(out: Path, step: int, model, optimizer_state: dict, scheduler, trainer_state: dict,
                    save_total_limit: int) -> Path:
    """checkpoint_step_N/: model/ (a loadable reward model; under LoRA adapters/, the adapters and the head
    with the base model's fingerprint), optimizer.safetensors + optimizer.json,
    trainer_state.json (last); then only the newest `save_total_limit` checkpoints are kept (bounded disk)."""
    from safetensors.torch import save_file
    final = out / f"checkpoint_step_{step}"
    tensors = {}
    tree = flatten_state({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                          "rng": rng_states()}, tensors)
    lora = bool(getattr(model, "lora_config", None))  # LoRA: adapters and head only; the base is not copied
    # Each part records its step (adapters' settings, model/config.json's "reward_model", optimizer.json),
    # so a part moved in from another checkpoint is refused on --resume (check_part_steps).
    settings = "lora_config" if lora else "provenance"
    kept = getattr(model, settings)
    with disk_errors(final):
        with atomic_dir(final) as tmp:
            setattr(model, settings, {**kept, "checkpoint_step": step})
            try:
                if lora:
                    save_adapters(model, tmp / "adapters")
                else:
                    model.save_pretrained(tmp / "model")
            finally:
                setattr(model, settings, kept)
            save_file(tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "optimizer.json", tree)
            write_json(tmp / "trainer_state.json", trainer_state)
        for old in checkpoint_dirs(out)[:-save_total_limit]:
            remove(old)
    return final


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json, checked to hold what train.py writes there, every field; and
    each part of the checkpoint checked to belong to its step (check_part_steps)."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(read_bounded(file, 2**20))
    except Exception as e:  # empty, cut short, not JSON, too deep: never a traceback
        raise unreadable(file, e) from None
    try:
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
            raise HandEdited("not the fields train.py writes")
        for key, low in (("step", 0), ("step_batch", 0), ("total_steps", 1), ("world_size", 1)):
            whole_number(state.get(key), key, low, 2**62)
        accuracy = state.get("best_accuracy")
        if type(accuracy) not in (int, float) or not -1 <= accuracy <= 1:  # NaN fails too
            raise HandEdited(f"best_accuracy {accuracy!r:.40} is not a number from -1 to 1")
        check_data_record(state.get("data"))
    except HandEdited as e:
        raise unreadable(file, e) from None
    check_part_steps(path, state["step"])  # a part of another step: refused before any weights load
    return state


class HandEdited(ValueError):
    """A checkpoint file that parses, but holds something train.py never writes there."""


def whole_number(value, what: str, low: int, high: int) -> int:
    """`value` as an int if it is a whole number from low to high (a float such as 3.0 counts), else HandEdited."""
    if type(value) is float and value.is_integer() or type(value) is int:
        if low <= value <= high:
            return int(value)
    raise HandEdited(f"{what} {value!r:.40} is not a whole number from {low} to {high}")


def check_data_record(data):
    """trainer_state.json's "data" (load_data's record of the training pairs read), or None (older runs)."""
    if data is None:
        return
    removed = data.get("removed") if isinstance(data, dict) else None  # --dedup, --decontaminate: counts
    if not (isinstance(data, dict) and data.keys() - {"removed"} == {"train_pairs", "train_digest", "files"}
            and (removed is None or isinstance(removed, dict) and all(type(n) is int for n in removed.values()))
            and type(data["train_pairs"]) is int and isinstance(data["train_digest"], str)
            and isinstance(data["files"], dict)
            and all(isinstance(v, list) and len(v) == 2 and all(type(x) in (int, float) for x in v)
                    for v in data["files"].values())):
        raise HandEdited(f"data {json.dumps(data)[:80]} is not the record of the training pairs train.py writes")


def check_part_steps(path: Path, step: int) -> int | None:
    """The step the model or the adapters of checkpoint `path` record: this checkpoint's step, or None for
    a checkpoint written before checkpoints recorded their step (restore_training_state accepts that only
    when optimizer.json records none either). A part moved in from another checkpoint would resume silently
    with the wrong weights: refused."""
    lora = (path / "adapters").is_dir()
    file = settings_file(path / "adapters") if lora else path / "model/config.json"
    if not file.is_file():
        raise unreadable(file, FileNotFoundError())
    try:
        config = json.loads(read_bounded(file, 2**20))
        recorded = (config if lora else config.get("reward_model") or {}).get("checkpoint_step")
    except Exception as e:
        raise unreadable(file, e) from None
    if recorded is not None and (type(recorded) is not int or recorded != step):
        raise unreadable(file, HandEdited(f"it belongs to step {recorded!r:.20}, not to this checkpoint's step "
                                          f"{step}: moved in from another checkpoint"))
    return recorded


def part_without_step(path: Path) -> UserError:
    file = settings_file(path / "adapters") if (path / "adapters").is_dir() else path / "model/config.json"
    return unreadable(file, HandEdited("it records no checkpoint step: an older train.py wrote it, or it was edited"))


def restore_training_state(path: Path, optimizer, scheduler, load_optimizer_state):
    """Put the optimizer, scheduler and RNG states saved in `path` back, read without pickle. What is read
    is bounded first by what `optimizer` can hold: the JSON's size, and the number and bytes of the tensors
    (from the safetensors header, before any data; Adam keeps two moments per parameter).
    A checkpoint holds state, never settings: every hyperparameter and flag (betas, amsgrad, maximize, ...)
    and the schedule come from `optimizer` and `scheduler` as this run built them. The files supply only
    tensors of exactly the shapes and dtypes this optimizer holds, step counters that are whole numbers
    within range, and RNG states of the exact form each generator uses. All of it is checked before
    anything is loaded (and before the run writes anything); anything else is refused in one line."""
    from safetensors.torch import load_file
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_tensors, max_bytes = 8 * len(params) + 64, 8 * sum(p.numel() for p in params) + 2**14 * len(params) + 2**20
    step = read_trainer_state(path)["step"]
    part_step = check_part_steps(path, step)  # None: an older checkpoint's model or adapters
    name = "optimizer.safetensors"
    try:
        with open_regular(path / name) as f:  # a FIFO in its place is refused, never waited on
            header = json.loads(f.read(min(int.from_bytes(f.read(8), "little"), 2**26)))
        spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        if len(spans) > max_tensors or sum(end - start for start, end in spans) > max_bytes:
            raise ValueError(f"{len(spans)} tensors, more than this model's optimizer state holds")
        tensors = load_file(path / name)
        name = "optimizer.json"
        saved = unflatten_state(json.loads(read_bounded(path / name, 2**20 + 2**12 * len(params))), tensors)
        # A checkpoint written before checkpoints recorded their step has no "step" here, nor in its model
        # or adapters: it resumes as before. A mix of the two is a part moved in from another checkpoint.
        older = isinstance(saved, dict) and saved.keys() == {"optimizer", "scheduler", "rng"}
        if not (older or isinstance(saved, dict) and saved.keys() == {"step", "optimizer", "scheduler", "rng"}):
            raise HandEdited("not the fields train.py writes")
        if older and part_step is not None:
            raise HandEdited("it records no step while the model or adapters record theirs: moved in from "
                             "another checkpoint")
        if not older and (type(saved["step"]) is not int or saved["step"] != step):
            raise HandEdited(f"it belongs to step {saved['step']!r:.20}, not to this checkpoint's step {step}: "
                             "moved in from another checkpoint")
        optimizer_state = checked_optimizer_state(saved["optimizer"], optimizer, step)
        scheduler_state = checked_scheduler_state(saved["scheduler"], scheduler, step)
        rng = checked_rng_states(saved["rng"])
    except Exception as e:
        raise unreadable(path / name, e) from None
    if part_step is None and not older:
        raise part_without_step(path)
    try:  # all checked above: what can still fail here is another model's state under FSDP
        load_optimizer_state(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        set_rng_states(rng)
    except Exception as e:
        raise unreadable(path / "optimizer.safetensors and optimizer.json", e) from None


# The optimizer's state, per parameter: what each kind holds. Second moments, bitsandbytes' block maxima
# and update norms are never negative; no state is inf or NaN.
NONNEGATIVE = {"exp_avg_sq", "max_exp_avg_sq", "state2", "absmax1", "absmax2", "unorm_vec"}


def expected_state(optimizer, group: dict, gindex: int, pindex: int, p) -> dict:
    """{name: (shape, dtype)} of the state `optimizer` keeps for parameter `p` (index pindex of group
    gindex), and "step": the form of its counter, a 0-dim float32 tensor (torch AdamW) or int (bitsandbytes)."""
    if isinstance(optimizer, torch.optim.AdamW):
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        return {"step": ((), torch.float32), **{k: (tuple(p.shape), p.dtype) for k in moments}}
    if hasattr(optimizer, "get_config") and hasattr(optimizer, "name2qmap"):  # bitsandbytes AdamW8bit
        config = optimizer.get_config(gindex, pindex, group)  # laid out as its init_state does
        expected = {"step": int}
        if config["optim_bits"] == 32 or p.numel() < config["min_8bit_size"]:
            expected.update(state1=(tuple(p.shape), torch.float32), state2=(tuple(p.shape), torch.float32))
        else:
            blocks = (p.numel() + 255) // 256  # its block size is 256
            expected.update(state1=(tuple(p.shape), torch.uint8), state2=(tuple(p.shape), torch.uint8),
                            qmap1=((256,), torch.float32), qmap2=((256,), torch.float32),
                            absmax1=((blocks,), torch.float32), absmax2=((blocks,), torch.float32))
        if config["max_unorm"] > 0:
            expected["unorm_vec"] = ((1,), torch.float32)
        return expected
    raise TypeError(f"no checkpoint layout for {type(optimizer).__name__}")


def checked_optimizer_state(saved, optimizer, step: int) -> dict:
    """The state dict to load into `optimizer`: the saved tensors and step counters, each checked against
    what this optimizer holds for that parameter, and every setting of param_groups taken from `optimizer`."""
    wrapped = getattr(optimizer, "_FSDP_WRAPPED_QUANT_STATE_KEY", None)  # bitsandbytes nests some tensors
    if not (isinstance(saved, dict) and saved.keys() == {"state", "param_groups"}
            and isinstance(saved["state"], dict) and isinstance(saved["param_groups"], list)
            and len(saved["param_groups"]) == len(optimizer.param_groups)):
        raise HandEdited("the optimizer state is not the fields train.py writes")
    groups, state = [], {}
    for gindex, (ours, theirs) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        if not (isinstance(theirs, dict) and isinstance(theirs.get("params"), list)
                and len(theirs["params"]) == len(ours["params"])):
            raise HandEdited(f"param_groups[{gindex}] does not hold this model's trainable parameters")
        groups.append({**{k: v for k, v in ours.items() if k != "params"}, "params": theirs["params"]})
        for pindex, (key, p) in enumerate(zip(theirs["params"], ours["params"])):
            if type(key) not in (int, str) or key in state or key not in saved["state"]:
                raise HandEdited(f"param_groups[{gindex}] names parameter {key!r:.40} twice, or one without state")
            entry = saved["state"][key]
            if isinstance(entry, dict) and isinstance(entry.get(wrapped), dict):
                entry = {**{k: v for k, v in entry.items() if k != wrapped}, **entry[wrapped]}
            state[key] = checked_parameter_state(entry, expected_state(optimizer, ours, gindex, pindex, p),
                                                 step, f"state[{key!r:.40}]")
    if len(saved["state"]) != len(state):
        raise HandEdited(f"{len(saved['state']) - len(state)} optimizer state entries belong to no parameter")
    for entry in state.values():  # bitsandbytes' quantisation maps are its constants, not state
        for k, name in (("qmap1", "dynamic"), ("qmap2", "udynamic")):
            if k in entry:
                if name not in optimizer.name2qmap:
                    optimizer.fill_qmap()
                entry[k] = optimizer.name2qmap[name]
    return {"state": state, "param_groups": groups}


def checked_parameter_state(entry, expected: dict, step: int, where: str) -> dict:
    """One parameter's saved state, if it is exactly `expected` (expected_state) with counters up to `step`."""
    if not (isinstance(entry, dict) and entry.keys() == expected.keys()):
        raise HandEdited(f"{where} holds {sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__}"
                         f"; this optimizer keeps {sorted(expected)}")
    entry = dict(entry)
    for k, form in expected.items():
        v = entry[k]
        if k == "step":
            if form is int:
                entry[k] = whole_number(v, f"{where}.step", 0, step)
                continue
            if not (torch.is_tensor(v) and tuple(v.shape) == () and v.dtype == torch.float32):
                raise HandEdited(f"{where}.step is not a float32 scalar tensor")
            whole_number(v.item(), f"{where}.step", 0, step)
            continue
        shape, dtype = form
        if not (torch.is_tensor(v) and tuple(v.shape) == shape and v.dtype == dtype):
            got = f"{tuple(v.shape)} {v.dtype}" if torch.is_tensor(v) else type(v).__name__
            raise HandEdited(f"{where}.{k} is {got}; this optimizer holds {shape} {dtype}")
        if v.is_floating_point() and v.numel():
            low, high = torch.aminmax(v)  # one pass, nothing allocated; a NaN anywhere makes both NaN
            if not (torch.isfinite(low) and torch.isfinite(high) and (k not in NONNEGATIVE or low >= 0)):
                raise HandEdited(f"{where}.{k} holds values no optimizer step produces (inf, NaN or negative)")
    return entry


def checked_scheduler_state(saved, scheduler, step: int) -> dict:
    """The scheduler state to load: its position, which is the checkpoint's step; everything else (the base
    rates, the schedule) as this run built it."""
    fresh = scheduler.state_dict()
    if not (isinstance(saved, dict) and saved.keys() == fresh.keys()):
        raise HandEdited("the scheduler state is not the fields train.py writes")
    position = {"last_epoch": step, "_step_count": step + 1}  # LambdaLR counts its first step at creation
    for key in position.keys() & fresh.keys():
        if type(saved[key]) is not int or saved[key] != position[key]:
            raise HandEdited(f"the scheduler's {key} is {saved[key]!r:.40}; at step {step} it is {position[key]}")
    return {**fresh, **{k: v for k, v in position.items() if k in fresh}}


def checked_rng_states(saved) -> dict:
    """RNG states of exactly the form each generator uses: python's (3, 625 words, gauss), numpy's MT19937
    key, torch's CPU ByteTensor of the size it has, and CUDA's (one ByteTensor per GPU, or None)."""
    if not (isinstance(saved, dict) and saved.keys() == {"python", "numpy", "torch", "cuda"}):
        raise HandEdited("the RNG states are not the fields train.py writes")
    py = saved["python"]
    if not (isinstance(py, tuple) and len(py) == 3 and py[0] == 3 and isinstance(py[1], tuple) and len(py[1]) == 625
            and all(type(x) is int and 0 <= x < 2**32 for x in py[1]) and py[1][-1] <= 624
            and (py[2] is None or type(py[2]) is float)):
        raise HandEdited("the python RNG state is not the form random.getstate() has")
    key = saved["numpy"]
    if not (isinstance(key, tuple) and len(key) == 5 and key[0] == "MT19937" and isinstance(key[1], np.ndarray)
            and key[1].shape == (624,) and type(key[2]) is int and 0 <= key[2] <= 624 and type(key[3]) is int
            and key[3] in (0, 1) and type(key[4]) is float):
        raise HandEdited("the numpy RNG state is not the form np.random.get_state() has")
    cpu = torch.get_rng_state()
    if not (torch.is_tensor(saved["torch"]) and saved["torch"].dtype == cpu.dtype and saved["torch"].shape == cpu.shape):
        raise HandEdited("the torch RNG state is not the form torch.get_rng_state() has")
    cuda = saved["cuda"]  # without a GPU now, never used: only its form is checked (16 bytes today)
    size = tuple(torch.cuda.get_rng_state(0).shape) if torch.cuda.is_available() else None
    if cuda is not None and not (isinstance(cuda, list) and len(cuda) <= 1024 and all(
            torch.is_tensor(s) and s.dtype == torch.uint8 and s.dim() == 1 and s.numel() <= 64
            and (size is None or tuple(s.shape) == size) for s in cuda)):
        raise HandEdited("the CUDA RNG states are not the form torch.cuda.get_rng_state_all() has")
    return saved


def unreadable(file: Path, e: Exception) -> UserError:
    """One line for a checkpoint file that is missing, not a regular file, corrupt, truncated or hand-edited."""
    if isinstance(e, NotRegularFile):
        return UserError(f"--resume: {e}")
    first_line = (str(e).splitlines() or [""])[0]
    what = "is missing" if isinstance(e, FileNotFoundError) else \
        f"is corrupt or hand-edited ({first_line[:160]})" if isinstance(e, HandEdited) else \
        f"is corrupt or truncated ({type(e).__name__}: {first_line[:120]})"
    return UserError(f"--resume: {file} {what}; resume from another checkpoint_step_N with --resume PATH, "
                     "or start again with --overwrite_output_dir")


# What a resume does with each TrainConfig field (docs/guarantees.md, "What --resume may change").
# SAME_RUN: what makes it the same run: the model, the training pairs and their order, the held-out pairs
# (the best model is picked on them), the optimizer's kind. Another value is refused in one line.
SAME_RUN = ("model", "from_scratch", "head", "pooling", "dataset", "eval_split", "eval_dataset", "eval_fraction",
            "max_train_samples", "max_eval_samples", "max_length", "seed", "freeze_layers", "model_8bit",
            "optim_8bit", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "chat_template", "dedup",
            "decontaminate", "loss", "pairs_from_ranked")
# MAY_CHANGE: honoured from the resumed step on and recorded in train_config.json. The schedule
# (learning_rate, num_epochs, max_steps, warmup_ratio: each later step gets the new schedule's rate),
# the update (weight_decay, max_grad_norm, center_rewards_coefficient), how the same pairs per step are
# computed (batch_size x gradient_accumulation_steps x processes must stay the same), the bookkeeping.
MAY_CHANGE = ("learning_rate", "num_epochs", "max_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
              "center_rewards_coefficient", "batch_size", "gradient_accumulation_steps", "bf16",
              "gradient_checkpointing", "compile", "packing", "share_prompt", "fsdp", "eval_steps", "save_steps",
              "save_total_limit", "logging_steps", "output_dir", "overwrite_output_dir", "resume", "device",
              "use_wandb", "wandb_project", "report_to", "progress", "save_adapters")


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
    # A digest without a version prefix is an older train.py's, of another kind: only the count compares.
    older = ":" not in saved["train_digest"]
    if saved["train_pairs"] != now["train_pairs"] or not older and saved["train_digest"] != now["train_digest"]:
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


def exit_if_stopped(train):
    """train.py's main: runs train(). A run stopped by a signal, its checkpoint saved, is not a finished run
    (`train.py && eval.py` must not go on): exit status 128 + the signal's number; a second Ctrl-C (ForcedStop)
    exits 130, as the first would."""
    try:
        result = train()
    except ForcedStop as e:
        if str(e):
            print(e, file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if "stopped_at" in result:
        sys.exit(128 + signal.Signals[result["signal"]].value)
    return result


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
