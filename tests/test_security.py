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

from conftest import ROOT

import eval as eval_cli
import train
from support.errors import run_cli

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
    train.train(train.parse_args([*DONE, "--output_dir", str(out)])[0])
    torch.set_num_threads(before)
    return out


def copy_run(done, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(done, out)
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
    """Met again without --resume, or with --resume once its checkpoints are gone: it is complete, and the
    way out is --overwrite_output_dir or another directory (not --resume)."""
    out, _ = copy_run(done, tmp_path)
    before = snapshot(out)
    code, err = cli(train.main, [*DONE, "--output_dir", out], capsys)
    assert_one_line(code, err, "holds a finished run (final_model/ is there)", "pass --overwrite_output_dir",
                    "or choose another --output_dir")
    assert "--resume" not in err
    shutil.rmtree(out / "checkpoint_step_1")
    before = snapshot(out)
    code, err = cli(train.main, [*DONE, "--output_dir", out, "--resume"], capsys)
    assert_one_line(code, err, "is complete (final_model/ is there)", "pass --overwrite_output_dir",
                    "or choose another --output_dir")
    assert "before its first" not in err
    assert snapshot(out) == before


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
