"""Hostile and careless checkpoints and output directories (issue 14).

- No code runs from a checkpoint: a pickle payload (an object whose __reduce__ creates a marker file)
  planted in any file of a checkpoint, or as an old-style optimizer.pt, never runs under
  `train.py --resume` or `eval.py`; each ends in one line (exit 2) or ignores the file it never reads.
- A damaged checkpoint (trainer_state.json empty, cut or of another shape; the optimizer state missing,
  cut, or claiming more tensors than the optimizer holds) ends in one line, and writes nothing.
- One run per --output_dir: while a train.py holds the directory a second is refused in one line; a
  SIGKILLed holder leaves it free, and --resume then works.
- Options that cannot work (--device foo/meta/mps, --seed beyond 64 bits) and a finished run met again
  end in one line that says what to do, and write nothing.
"""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, as_if_stopped_at

import eval as eval_cli
import train
from support.errors import UserError, run_cli

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("RM_DEBUG", None)
# A finished tiny run: 2 steps, a checkpoint after step 1.
DONE = ["--config", "demo", "--max_train_samples", "8", "--max_eval_samples", "8", "--max_steps", "2",
        "--save_steps", "1", "--eval_steps", "1000", "--logging_steps", "1", "--batch_size", "4", "--no_progress"]


class Payload:
    """Unpickling this creates `marker`: what an attacker's __reduce__ would do, made harmless and visible."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("sec") / "done"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train.train(train.parse_command_line([*DONE, "--output_dir", str(out)]).config)
    torch.set_num_threads(before)
    return out


def copy_run(done, tmp_path, finished=False):
    """A copy of the finished run, or (by default) of the run as it was when it stopped after checkpoint 1."""
    out = tmp_path / "run"
    if finished:
        shutil.copytree(done, out)
    else:
        as_if_stopped_at(done, out, "checkpoint_step_1")
    return out, out / "checkpoint_step_1"


def snapshot(path):
    return sorted((str(p.relative_to(path)), *((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ()))
                  for p in [path, *path.rglob("*")]) if path.exists() else None


def cli(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python train.py/eval.py ARGV`, run in this process."""
    capsys.readouterr()
    try:
        run_cli(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def assert_one_line(code, err, *expected):
    assert code == 2, (code, err[-2000:])
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


def checkpoint_files(ckpt):
    files = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file())
    assert {"trainer_state.json", "optimizer.safetensors", "optimizer.json", "model/model.safetensors",
            "model/config.json", "model/tokenizer.json"} <= {str(f) for f in files}
    return files


def test_the_payload_is_live(tmp_path):
    """The planted bytes do run code when unpickled (so the tests below would see it if anything did)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    torch.save(Payload(marker), tmp_path / "optimizer.pt")
    torch.load(tmp_path / "optimizer.pt", weights_only=False)  # what train.py used to do
    assert marker.exists()


@pytest.mark.parametrize("file", ["trainer_state.json", "optimizer.safetensors", "optimizer.json",
                                  "model/model.safetensors", "model/config.json", "model/tokenizer.json",
                                  "model/tokenizer_config.json"])
def test_pickle_planted_in_a_checkpoint_file_never_runs(done, tmp_path, capsys, file):
    """One file replaced by a pickle payload, the others intact: --resume and eval.py either refuse in one
    line or never read it; the payload never runs."""
    out, ckpt = copy_run(done, tmp_path)
    marker = tmp_path / "ran"
    (ckpt / file).write_bytes(pickle.dumps(Payload(marker)))
    for main, argv in ((train.main, [*DONE, "--output_dir", out, "--resume", ckpt]),
                       (eval_cli.main, [ckpt, "--dataset", "demo", "--max_samples", "4",
                                        "--output", tmp_path / "report.json"])):
        code, err = cli(main, argv, capsys)
        assert not marker.exists(), f"{main.__module__} ran the payload planted in {file}"
        if code != 0:
            assert_one_line(code, err, file.split("/")[-1])


def test_pickle_planted_in_every_file_and_an_old_optimizer_pt_never_runs(done, tmp_path):
    """Every file of the checkpoint a payload, plus a torch.save'd optimizer.pt; through the real CLIs."""
    out, ckpt = copy_run(done, tmp_path)
    marker = tmp_path / "ran"
    for f in checkpoint_files(ckpt):
        (ckpt / f).write_bytes(pickle.dumps(Payload(marker)))
    torch.save(Payload(marker), ckpt / "optimizer.pt")
    for argv in (["train.py", *DONE, "--output_dir", out, "--resume", ckpt],
                 ["train.py", *DONE, "--output_dir", out, "--resume"],
                 ["eval.py", ckpt, "--dataset", "demo", "--output", tmp_path / "report.json"]):
        proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert not marker.exists(), f"{argv[0]} ran the payload"
        assert_one_line(proc.returncode, proc.stderr.strip())
        if argv[0] == "train.py":
            assert "optimizer.pt, a pickle file" in proc.stderr and "can run arbitrary code" in proc.stderr


def test_checkpoint_of_an_older_version_is_refused_saying_why(done, tmp_path, capsys):
    out, ckpt = copy_run(done, tmp_path)
    (ckpt / "optimizer.safetensors").unlink()
    (ckpt / "optimizer.json").unlink()
    torch.save({"optimizer": {}, "scheduler": {}, "rng": {}}, ckpt / "optimizer.pt")
    before = snapshot(out)
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys),
                    "optimizer.pt, a pickle file", "loading pickle can run arbitrary code, so it is not read",
                    "--overwrite_output_dir or in a new --output_dir")
    assert snapshot(out) == before


def header_claiming(nbytes: int) -> bytes:
    """A safetensors header (no data) that claims one tensor of `nbytes` bytes."""
    header = json.dumps({"s.big": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    return len(header).to_bytes(8, "little") + header


DAMAGE = {  # file -> (what to write, None = delete), what the message says
    "empty trainer_state.json": ("trainer_state.json", b"", "trainer_state.json is corrupt or truncated"),
    "cut trainer_state.json": ("trainer_state.json", b'{"step": 1, "conf', "trainer_state.json is corrupt"),
    "trainer_state.json a list": ("trainer_state.json", b"[1, 2]", "not the fields train.py writes"),
    "trainer_state.json too deep": ("trainer_state.json", b"[" * 100000, "trainer_state.json is corrupt"),
    "missing optimizer state": ("optimizer.safetensors", None, "optimizer.safetensors is missing"),
    "truncated optimizer state": ("optimizer.safetensors", 2000, "optimizer.safetensors is corrupt or truncated"),
    "optimizer state larger than the optimizer": ("optimizer.safetensors", header_claiming(2**40),
                                                  "more than this model's optimizer state holds"),
    "missing optimizer.json": ("optimizer.json", None, "optimizer.json is missing"),
    "truncated optimizer.json": ("optimizer.json", 100, "optimizer.json is corrupt or truncated"),
    "optimizer.json naming no tensor": ("optimizer.json", b'{"__tensor__": "nope"}', "optimizer.json is corrupt"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_and_writes_nothing(done, tmp_path, capsys, case):
    out, ckpt = copy_run(done, tmp_path)
    name, content, expected = DAMAGE[case]
    if content is None:
        (ckpt / name).unlink()
    elif isinstance(content, int):  # cut to that many bytes
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:content])
    else:
        (ckpt / name).write_bytes(content)
    before = snapshot(out)
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys), expected,
                    "resume from another checkpoint_step_N with --resume PATH")
    assert snapshot(out) == before


OPTIONS = {
    "--device foo": (["--device", "foo"], "--device must be cpu, cuda, cuda:N or mps (got 'foo')"),
    "--device meta": (["--device", "meta"], "--device must be cpu, cuda, cuda:N or mps (got 'meta')"),
    "--seed 2**70": (["--seed", str(2**70)], f"--seed must be an integer from 0 to 2**63 - 1 (got {2**70})"),
}
if not torch.backends.mps.is_available():
    OPTIONS["--device mps without MPS"] = (["--device", "mps"], "this PyTorch build or machine has no MPS")


@pytest.mark.parametrize("case", list(OPTIONS))
def test_impossible_option_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    flags, expected = OPTIONS[case]
    out = tmp_path / "out"
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", out, *flags], capsys), expected)
    assert not out.exists()


def test_finished_run_says_it_is_complete(done, tmp_path, capsys):
    """Met again without --resume, or with --resume asking for no more steps than it had (its checkpoints there
    or gone): it is complete, nothing is touched, and the way on is said: --resume with a larger --max_steps
    while a checkpoint remains (test_train.py::test_a_finished_run_resumed_with_more_steps_trains_further_as_any_resume),
    else a new run from its final model; or --overwrite_output_dir, or another directory."""
    out, _ = copy_run(done, tmp_path, finished=True)
    before = snapshot(out)
    code, err = cli(train.main, [*DONE, "--output_dir", out], capsys)
    assert_one_line(code, err, "holds a finished run (final_model/ is there)", "pass --overwrite_output_dir",
                    "--resume with a larger --max_steps or --num_epochs to train it further", "or choose another --output_dir")
    # --resume while its checkpoints remain (latest, or named) to as many steps would train the same steps again
    for resume in (["--resume"], ["--resume", out / "checkpoint_step_1"], ["--resume", "--max_steps", "1"]):
        code, err = cli(train.main, [*DONE, "--output_dir", out, *resume], capsys)
        ends = 1 if "1" in resume else 2
        assert_one_line(code, err, f"--resume: the run in {out} is complete at step 2 (final_model/ is there) and "
                        f"this run ends at step {ends}; pass a larger --max_steps or --num_epochs to train it further")
        assert snapshot(out) == before
    (out / "log.jsonl").unlink()  # no log: the step is the total of the run that wrote the newest checkpoint
    code, err = cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys)
    assert_one_line(code, err, "is complete at step 2 (final_model/ is there) and this run ends at step 2")
    shutil.rmtree(out / "checkpoint_step_1")
    before = snapshot(out)
    for resume in (["--resume"], ["--resume", "--max_steps", "5"]):
        code, err = cli(train.main, [*DONE, "--output_dir", out, *resume], capsys)
        assert_one_line(code, err, "is complete (final_model/ is there) and kept no checkpoint to continue from",
                        f"start a new run from its model to train it further (--model {out} and "
                        "another --output_dir", "pass --overwrite_output_dir", "or choose another --output_dir")
        assert "before its first" not in err
        assert snapshot(out) == before
    code, err = cli(train.main, [*DONE, "--output_dir", out], capsys)
    assert_one_line(code, err, "holds a finished run", f"start a new run from its model to train it further (--model {out} and another")
    assert "--resume" not in err


# ---- one run per directory -----------------------------------------------------------------------

SLOW = ["--config", "demo", "--max_train_samples", "48", "--max_eval_samples", "8", "--batch_size", "4",
        "--max_steps", "100000", "--save_steps", "5", "--eval_steps", "100000", "--logging_steps", "1",
        "--no_progress"]


def start(out, *extra):
    return subprocess.Popen([sys.executable, "train.py", *SLOW, "--output_dir", str(out), *extra], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def newest_step(out):
    from support.checkpoint import checkpoint_dirs
    ckpts = checkpoint_dirs(out) if out.exists() else []
    return int(ckpts[-1].name.rsplit("_", 1)[1]) if ckpts else 0


def test_second_run_in_a_held_directory_is_refused_and_a_killed_holder_leaves_it_free(tmp_path, capsys):
    out = tmp_path / "out"
    holder = start(out)
    try:
        wait_until(lambda: newest_step(out) >= 5, holder)  # it holds the directory and has checkpointed
        for extra in ([], ["--resume"], ["--overwrite_output_dir"]):
            code, err = cli(train.main, [*SLOW, "--output_dir", out, *extra], capsys)
            assert_one_line(code, err, f"--output_dir {out} is in use by another train.py run "
                                       f"(process {holder.pid})", "wait for it to end, or choose another")
        assert holder.poll() is None  # the holder ran on, undisturbed
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").is_file()  # left behind by the SIGKILL, but no longer locked:
    killed_at = newest_step(out)
    resumed = start(out, "--resume")
    try:
        wait_until(lambda: newest_step(out) > killed_at, resumed)  # past the lock, training, checkpointing
    finally:
        resumed.kill()
        resumed.wait()


# ---- a checkpoint holds state, not settings (issue 21, section 2) ----------------------------------


def tree_bytes(path):
    """Every file under `path` with its bytes (and every directory): what 'untouched' means, exactly."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def edit_optimizer_state(ckpt, edit):
    """Apply edit(tree, tensors) to optimizer.json (the JSON tree) and optimizer.safetensors (its tensors)."""
    from safetensors.torch import load_file, save_file
    tree = json.loads((ckpt / "optimizer.json").read_text())
    tensors = load_file(ckpt / "optimizer.safetensors")
    edit(tree, tensors)
    save_file(tensors, ckpt / "optimizer.safetensors")
    (ckpt / "optimizer.json").write_text(json.dumps(tree))


def first_param(tree):
    return tree["optimizer"]["state"]["__int_keys__"]["0"]


def set_group(key, value):
    def edit(tree, tensors):
        for group in tree["optimizer"]["param_groups"]:
            group[key] = value
    return edit


def set_scheduler(key, value):
    def edit(tree, tensors):
        tree["scheduler"][key] = value
    return edit


def set_tensor(which, make):
    """Replace the tensor that first_param(tree)[which] (or tree["rng"][which]) names by make(old)."""
    def edit(tree, tensors):
        ref = first_param(tree).get(which) or tree["rng"][which]
        tensors[ref["__tensor__"]] = make(tensors[ref["__tensor__"]])
    return edit


# Settings a hand edit may put into optimizer.json: the run's own configuration decides them, so the
# resumed run ends exactly as the uninterrupted one (today: a crash at the first resumed step, after
# log.jsonl was cut back, or gradient ascent, or another learning rate).
SETTINGS = {
    "amsgrad true": set_group("amsgrad", True),
    "betas of one value": set_group("betas", [0.5]),
    "capturable true": set_group("capturable", True),
    "maximize true (gradient ascent)": set_group("maximize", True),
    "another lr, eps and weight decay": lambda tree, tensors: [set_group(k, v)(tree, tensors) for k, v in
                                                               (("lr", 5.0), ("eps", 1.0), ("weight_decay", 9.0))],
    "scheduler base_lrs and last rates": lambda tree, tensors: [set_scheduler(k, [7.0, 7.0])(tree, tensors)
                                                                for k in ("base_lrs", "_last_lr")],
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_settings_edited_into_the_optimizer_state_are_ignored(done, tmp_path, capsys, case):
    out, ckpt = copy_run(done, tmp_path)
    edit_optimizer_state(ckpt, SETTINGS[case])
    code, err = cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys)
    assert code == 0, err[-3000:]
    from safetensors.torch import load_file
    a, b = load_file(done / "final_model" / "model.safetensors"), load_file(out / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case


def nan_at_0(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# Each: (file, edit, what the message says). The run directory must stay byte for byte as it was.
HAND_EDITED = {
    "a moment of the wrong shape": ("optimizer.json", set_tensor("exp_avg", lambda t: t.reshape(-1)[:-1].clone()),
                                    "this optimizer holds"),
    "a moment of the wrong dtype": ("optimizer.json", set_tensor("exp_avg", lambda t: t.double()),
                                    "torch.float64; this optimizer holds"),
    "a negative step": ("optimizer.json", set_tensor("step", lambda t: torch.tensor(-1.0)),
                        "step -1.0 is not a whole number from 0 to 1"),
    "a fractional step": ("optimizer.json", set_tensor("step", lambda t: torch.tensor(0.5)), "is not a whole number"),
    "a step beyond the checkpoint's": ("optimizer.json", set_tensor("step", lambda t: torch.tensor(1e9)),
                                       "is not a whole number from 0 to 1"),
    "a step of another dtype": ("optimizer.json", set_tensor("step", lambda t: t.long()), "not a float32 scalar"),
    "a NaN second moment": ("optimizer.json", set_tensor("exp_avg_sq", nan_at_0), "values no optimizer step produces"),
    "a negative second moment": ("optimizer.json", set_tensor("exp_avg_sq", lambda t: -1 - t),
                                 "values no optimizer step produces"),
    "a state entry with another key": ("optimizer.json", lambda tree, tensors: first_param(tree).update(
        max_exp_avg_sq=first_param(tree)["exp_avg"]), "this optimizer keeps ['exp_avg', 'exp_avg_sq', 'step']"),
    "a parameter's state missing": ("optimizer.json", lambda tree, tensors: tree["optimizer"]["state"][
        "__int_keys__"].pop("0"), "or one without state"),
    "a non-numeric last_epoch": ("optimizer.json", set_scheduler("last_epoch", "x"), "the scheduler's last_epoch"),
    "another last_epoch": ("optimizer.json", set_scheduler("last_epoch", 5), "at step 1 it is 1"),
    "a torch RNG state of another size": ("optimizer.json", set_tensor("torch", lambda t: t[:100].clone()),
                                          "the torch RNG state"),
    "a python RNG state cut short": ("optimizer.json", lambda tree, tensors: tree["rng"]["python"]["__tuple__"][1][
        "__tuple__"].pop(), "the python RNG state"),
    "a numpy RNG key of another length": ("optimizer.json", lambda tree, tensors: tensors.update(
        {tree["rng"]["numpy"]["__tuple__"][1]["__ndarray__"]: torch.zeros(10, dtype=torch.int64)}),
        "the numpy RNG state"),
    # today: 80 MB per reference, before anything is checked (a 13 KB file reached 2.6 GiB)
    "an array given a dtype that multiplies its size": ("optimizer.json", lambda tree, tensors: tree["rng"]["numpy"][
        "__tuple__"][1].update(dtype="(128,128)f8"), "only numpy's uint32 RNG key"),
    "optimizer state of another step": ("optimizer.json", lambda tree, tensors: tree.update(step=7),
                                        "belongs to step 7, not to this checkpoint's step 1"),
}
TRAINER_STATE_EDITS = {  # trainer_state.json's fields: (key, value, what the message says)
    "best_accuracy NaN": ("best_accuracy", float("nan"), "best_accuracy nan is not a number from -1 to 1"),
    "best_accuracy 7": ("best_accuracy", 7, "best_accuracy 7 is not a number from -1 to 1"),
    "data a number": ("data", 5, "is not the record of the training pairs"),
    "data files a list": ("data", {"train_pairs": 8, "train_digest": "x", "files": [1]}, "is not the record"),
    "total_steps a string": ("total_steps", "4", "total_steps '4' is not a whole number"),
    "step true": ("step", True, "step True is not a whole number"),
}


@pytest.mark.parametrize("case", [*HAND_EDITED, *TRAINER_STATE_EDITS, "model of another step", "model of no step"])
def test_hand_edited_checkpoint_is_one_line_and_the_run_directory_untouched(done, tmp_path, capsys, case):
    """Every field is checked before anything changes on disk: one line, exit 2, and the run directory
    byte for byte as it was (log.jsonl not cut back)."""
    out, ckpt = copy_run(done, tmp_path)
    (out / "log.jsonl").write_text((done / "log.jsonl").read_text())  # two steps logged: a cut would show
    if case in HAND_EDITED:
        file, edit, expected = HAND_EDITED[case]
        edit_optimizer_state(ckpt, edit)
    elif case in TRAINER_STATE_EDITS:
        key, value, expected = TRAINER_STATE_EDITS[case]
        file, state = "trainer_state.json", json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / file).write_text(json.dumps({**state, key: value}))
    else:  # the weights of another step moved in (here: said to be), or of a checkpoint that records none
        file, config = "model/config.json", json.loads((ckpt / "model/config.json").read_text())
        if case == "model of another step":
            expected, config["reward_model"]["checkpoint_step"] = "belongs to step 3, not to this checkpoint's step 1", 3
        else:
            expected = "it records no checkpoint step: an older train.py wrote it, or it was edited"
            del config["reward_model"]["checkpoint_step"]
        (ckpt / file).write_text(json.dumps(config))
    before = tree_bytes(out)
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys),
                    f"{ckpt / file} is corrupt or hand-edited", expected,
                    "resume from another checkpoint_step_N with --resume PATH")
    assert tree_bytes(out) == before


def test_a_checkpoint_written_before_checkpoints_recorded_their_step_still_resumes(done, tmp_path, capsys):
    """Checkpoints written before the step was recorded in each part (no "step" in optimizer.json, no
    checkpoint_step in the model's config, a data digest of the older kind) resume as before, bitwise; only a
    mix of the two is refused."""
    out, ckpt = copy_run(done, tmp_path)
    edit_optimizer_state(ckpt, lambda tree, tensors: tree.pop("step"))
    config = json.loads((ckpt / "model/config.json").read_text())
    del config["reward_model"]["checkpoint_step"]
    (ckpt / "model/config.json").write_text(json.dumps(config))
    state = json.loads((ckpt / "trainer_state.json").read_text())  # an older train.py's data digest: another kind
    state["data"]["train_digest"] = state["data"]["train_digest"].split(":")[-1][::-1]  # (no version prefix)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)  # the model records no step, optimizer.json (put back below) records step 1
    edit_optimizer_state(mixed / "checkpoint_step_1", lambda tree, tensors: tree.update(step=1))
    code, err = cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys)
    assert code == 0, err[-3000:]
    from safetensors.torch import load_file
    a, b = load_file(done / "final_model" / "model.safetensors"), load_file(out / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = tree_bytes(mixed)
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", mixed, "--resume"], capsys),
                    "model/config.json is corrupt or hand-edited", "it records no checkpoint step")
    assert tree_bytes(mixed) == before


# ---- the lock, a full disk, a finished run, eval.py's saved settings and plots (issue 21, sections 4, 5) ----


def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")
    monkeypatch.setattr(train, "build_model", refuse)


@pytest.mark.parametrize("kind", ["link to a file outside", "dangling link", "directory", "FIFO"])
def test_a_lock_that_is_not_a_regular_file_is_refused_naming_it_and_never_followed(tmp_path, capsys, monkeypatch,
                                                                                 kind):
    """train.py used to follow a .lock symlink, truncating (or creating) the file it points to outside the
    output directory. Now: one line naming the lock, before the model and data load; nothing touched."""
    out, outside = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    outside.write_text("not yours to truncate")
    lock = out / ".lock"
    if kind == "link to a file outside":
        lock.symlink_to(outside)
    elif kind == "dangling link":
        lock.symlink_to(tmp_path / "created-outside")
    elif kind == "directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    words = {"directory": "a directory", "FIFO": "a named pipe (FIFO)"}.get(kind, "a symbolic link")
    no_model_load(monkeypatch)
    before = tree_bytes(tmp_path)
    for resume in ([], ["--resume"]):
        assert_one_line(*cli(train.main, [*DONE, "--output_dir", out, *resume], capsys),
                        f"--output_dir {out}: its lock file {lock} is {words}, not the file train.py writes there; "
                        f"remove it (if no train.py uses {out}) or choose another --output_dir")
        assert tree_bytes(tmp_path) == before
    # the same when it appears between the checks and the claim: never opened through the link
    from support import checkpoint
    with pytest.raises(UserError, match="its lock file"):
        checkpoint.take_output_dir(out)
    assert tree_bytes(tmp_path) == before and not (tmp_path / "created-outside").exists()


def test_another_users_lock_is_one_line(tmp_path, capsys, monkeypatch):
    """A stale .lock this user may not open (another user's; simulated: the tests may run as root, whom
    permissions do not stop) is one line naming it, not a traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("4242\n")
    real_open = os.open

    def open_as_another_user(path, flags, *args, **kwargs):
        if str(path) == str(out / ".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", open_as_another_user)
    no_model_load(monkeypatch)
    before = tree_bytes(out)
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", out], capsys),
                    f"--output_dir {out}: cannot open its lock file {out / '.lock'} (Permission denied): it may "
                    "belong to another user's run")
    assert tree_bytes(out) == before


def full_disk(monkeypatch, under):
    """Every os.write to a file under `under` fails as on a full disk (after the file was created)."""
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(under)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_leaves_no_probe_and_no_directory_behind(done, tmp_path, capsys, monkeypatch):
    """The write probe of --output_dir (fresh, and --resume) and of eval.py --output: on a full disk the
    probe and the directories made for it are removed again; one line, nothing of the run left."""
    stopped, _ = copy_run(done, tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    full_disk(monkeypatch, tmp_path)
    before = tree_bytes(tmp_path)
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", disk / "new" / "deep"], capsys),
                    f"cannot write to --output_dir {disk / 'new' / 'deep'} (No space left on device)")
    assert_one_line(*cli(train.main, [*DONE, "--output_dir", stopped, "--resume"], capsys),
                    f"cannot write to --output_dir {stopped} (No space left on device)")
    assert_one_line(*cli(eval_cli.main, [done / "final_model", "--dataset", "demo", "--max_samples", "4",
                                         "--output", disk / "new" / "deep" / "report.json"], capsys),
                    "(No space left on device); choose another --output")
    assert tree_bytes(tmp_path) == before


def test_eval_plots_under_a_file_fails_before_scoring(done, tmp_path, capsys):
    """--plots FILE/x used to fail after scoring, with the report already written: now checked up front."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    report = tmp_path / "report.json"
    assert_one_line(*cli(eval_cli.main, [done / "final_model", "--dataset", "demo", "--output", report,
                                         "--plots", a_file / "x"], capsys),
                    f"cannot write the plots to --plots {a_file / 'x'} (Not a directory)")
    assert not report.exists() and a_file.read_text() == "not a directory"


@pytest.mark.parametrize("key, value, expected", [
    ("eval_fraction", "0.05", "has eval_fraction '0.05', which must be a number between 0 and 1"),
    ("eval_fraction", 5, "has eval_fraction 5, which must be a number between 0 and 1"),
    ("eval_fraction", True, "has eval_fraction True, which must be a number between 0 and 1"),
    ("share_prompt", "yes", "has share_prompt 'yes', which must be true or false"),
    ("dataset", 5, "has dataset 5, which must be a name or a list of names"),
    ("max_length", 1.5, "has max_length 1.5, which must be a whole number >= 2"),
])
def test_a_saved_setting_of_the_wrong_type_is_one_line_in_eval(done, tmp_path, capsys, key, value, expected):
    model = tmp_path / "model"
    shutil.copytree(done / "final_model", model)
    config = json.loads((model / "config.json").read_text())
    config["reward_model"][key] = value
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line(*cli(eval_cli.main, [model, "--max_samples", "4", "--output", tmp_path / "r.json"], capsys),
                    f"{model}: its \"reward_model\" entry {expected}")
    assert not (tmp_path / "r.json").exists()


@pytest.fixture(scope="module")
def done_8bit(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("sec8") / "done"
    train.train(train.parse_command_line([*DONE, "--8bit_optim", "--output_dir", str(out)]).config)
    return out


def quantised_entry(tree):
    """The state of the first parameter that AdamW8bit keeps in 8 bits (its tensors nested under a key)."""
    entries = tree["optimizer"]["state"]["__int_keys__"].values()
    return next(e for e in entries if "__bnb_optimizer_quant_state__" in e)


def set_quantised(which, make):
    def edit(tree, tensors):
        name = quantised_entry(tree)["__bnb_optimizer_quant_state__"][which]["__tensor__"]
        tensors[name] = make(tensors[name])
    return edit


@pytest.mark.parametrize("case, edit, expected", [
    ("betas edited", set_group("betas", [0.5, 0.5]), None),
    ("an 8-bit state as float32", set_quantised("state1", lambda t: t.float()), "torch.uint8"),
    ("a block maximum NaN", set_quantised("absmax1", nan_at_0), "values no optimizer step produces"),
    ("a block maximum of another length", set_quantised("absmax2", lambda t: t[:-1].clone()), "absmax2 is"),
    ("a negative step", lambda tree, tensors: quantised_entry(tree).update(step=-1), "step -1 is not a whole number"),
])
def test_8bit_optimizer_state_holds_state_not_settings(done_8bit, tmp_path, capsys, case, edit, expected):
    """bitsandbytes AdamW8bit's state is checked as AdamW's: settings ignored, its own layout required."""
    out, ckpt = copy_run(done_8bit, tmp_path)
    edit_optimizer_state(ckpt, edit)
    before = tree_bytes(out)
    code, err = cli(train.main, [*DONE, "--8bit_optim", "--output_dir", out, "--resume"], capsys)
    if expected is None:
        assert code == 0, err[-3000:]
        from safetensors.torch import load_file
        a = load_file(done_8bit / "final_model" / "model.safetensors")
        b = load_file(out / "final_model" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert_one_line(code, err, f"{ckpt / 'optimizer.json'} is corrupt or hand-edited", expected)
        assert tree_bytes(out) == before


def test_a_hand_edited_log_line_is_dropped_when_the_log_is_cut_back(done, tmp_path, capsys):
    """log.jsonl is cut back to the checkpoint's step on --resume; a record whose step is not a number (hand
    edited) goes with the steps after it, instead of a traceback halfway through claiming the directory."""
    out, _ = copy_run(done, tmp_path)
    lines = (done / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join([lines[0], '{"step": "x", "loss": 1}', '{"loss": 2}', *lines[1:]]) + "\n")
    code, err = cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys)
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [json.loads(line)["step"] for line in lines]


@pytest.mark.parametrize("name", ["optimizer.safetensors", "optimizer.json"])
def test_a_fifo_in_place_of_the_optimizer_state_is_refused_and_never_waited_on(done, tmp_path, name):
    """A named pipe where a checkpoint file should be: opening it for reading would wait for a writer
    forever. `--resume` refuses it in one line (saying what it is) and writes nothing; the timeout turns a
    regression into a failure instead of a hang."""
    out, ckpt = copy_run(done, tmp_path)
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "train.py", *DONE, "--output_dir", str(out), "--resume"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert_one_line(proc.returncode, proc.stderr.strip(), f"{name} is a named pipe (FIFO), not a regular file")
    assert snapshot(out) == before


@pytest.mark.parametrize("command,name", [("eval", "model.safetensors"), ("resume", "model.safetensors"),
                                          ("eval", "tokenizer.json")])
def test_a_fifo_in_place_of_the_weights_is_named_for_what_it_is(done, tmp_path, command, name):
    """A named pipe where model.safetensors should be is refused in one line saying what it is (it was
    reported as missing weights), under eval.py and --resume alike, and never waited on."""
    out, ckpt = copy_run(done, tmp_path, finished=command == "eval")
    weights = (out / "final_model" if command == "eval" else ckpt / "model") / name
    weights.unlink()
    os.mkfifo(weights)
    args = ["eval.py", str(out / "final_model"), "--dataset", "demo", "--max_samples", "4"] if command == "eval" \
        else ["train.py", *DONE, "--output_dir", str(out), "--resume"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert_one_line(proc.returncode, proc.stderr.strip(), f"{weights} is a named pipe (FIFO), not a regular file")


def test_the_regular_file_check_tests_the_descriptor_it_opened(tmp_path, monkeypatch):
    """fileio.open_regular checks what it opened (fstat of the descriptor), not the path again: a FIFO swapped
    in for the open and a regular file swapped back right after (a race an attacker can win) is refused, and
    the checked path is never read twice. A second os.stat(path) would pass it and hand back the FIFO."""
    from support import fileio
    path, fifo, real = tmp_path / "data.jsonl", tmp_path / "fifo", tmp_path / "real"
    path.write_text("{}\n")
    real_open = os.open

    def swapping_open(name, flags, *args):
        if str(name) != str(path):
            return real_open(name, flags, *args)
        os.rename(path, real)  # the FIFO takes the path for the open...
        os.mkfifo(fifo)
        os.rename(fifo, path)
        try:
            return real_open(name, flags, *args)
        finally:
            os.replace(real, path)  # ...and the regular file is back before any later check of the path
    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(fileio.NotRegularFile, match="is a named pipe \\(FIFO\\), not a regular file"):
        fileio.open_regular(path)
    monkeypatch.setattr(os, "open", real_open)
    with fileio.open_regular(path) as f:  # untouched, it reads
        assert f.read() == b"{}\n"


def test_a_resume_on_fewer_gpus_sets_the_rng_states_of_the_gpus_it_has(monkeypatch):
    """A checkpoint from 4 GPUs resumed on 2 (faked on the CPU): GPU i gets the checkpoint's state i, and the
    states of GPUs 2 and 3 are skipped (setting them raised: no such device); the CPU states come back."""
    from support import checkpoint
    saved = checkpoint.rng_states()
    saved["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state[0].item(), device)))
    expected = torch.rand(3)
    checkpoint.set_rng_states(saved)
    assert calls == [(0, 0), (1, 1)]
    assert torch.equal(torch.rand(3), expected)  # the CPU generator is back where it was saved


def test_optimizer_state_entries_of_no_parameter_are_refused_as_hand_edited():
    """An optimizer state with an entry no param_group names (a copy of a real one, so every entry on its own
    is valid) is refused as hand-edited; the same state without it loads."""
    import copy
    from support import checkpoint
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    assert checkpoint.checked_optimizer_state(copy.deepcopy(saved), optimizer, 1)["state"].keys() == {0, 1}
    saved["state"][2] = copy.deepcopy(saved["state"][0])
    with pytest.raises(checkpoint.HandEdited, match="^1 optimizer state entries belong to no parameter$"):
        checkpoint.checked_optimizer_state(saved, optimizer, 1)
