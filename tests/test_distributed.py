"""torchrun data parallelism on CPU (gloo, 2 processes, the demo's tiny model): DDP and FSDP2 equal one
process with the whole batch, resume on 2 processes is exact, and only rank 0 writes files."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

COMMON = ["--config", "demo", "--max_train_samples", "40", "--max_eval_samples", "8", "--learning_rate", "1e-4",
          "--warmup_ratio", "0", "--no_progress", "--eval_steps", "1000", "--save_steps", "2", "--max_steps", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(out, *extra, procs=2, cwd=None):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 \
        else [sys.executable]
    cmd = [*prefix, str(ROOT / "train.py"), *COMMON, "--output_dir", str(out), *extra]
    result = subprocess.run(cmd, cwd=cwd or ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(out, name="final_model"):
    return load_file(os.path.join(out, name, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    launch(root / "single", "--batch_size", "4", procs=1)
    launch(root / "ddp", "--batch_size", "2", cwd=root)
    launch(root / "fsdp", "--batch_size", "2", "--fsdp", cwd=root)
    launch(root / "fsdp_shared", "--batch_size", "2", "--fsdp", "--share_prompt", "--packing", cwd=root)
    return root


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp_shared"])  # fsdp_shared: with shared-prompt packed batches
def test_two_processes_equal_one_with_the_whole_batch(runs, mode):
    assert max_diff(weights(runs / "single"), weights(runs / mode)) < 1e-5


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_on_two_processes_is_exact(runs, tmp_path, mode):
    out = tmp_path / mode
    shutil.copytree(runs / mode, out)
    for p in out.iterdir():  # as if the run had died right after its step-2 checkpoint
        if p.name != "checkpoint_step_2":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    extra = ["--fsdp"] if mode == "fsdp" else []
    result = launch(out, "--batch_size", "2", "--resume", *extra)
    assert "resumed from" in result.stdout
    assert torch.equal(torch.cat([v.flatten() for v in weights(runs / mode).values()]),
                       torch.cat([v.flatten() for v in weights(out).values()]))


def test_only_rank_0_writes(runs):
    for mode in ("ddp", "fsdp"):
        assert sorted(p.name for p in (runs / mode).iterdir() if p.name != ".lock") == [
            "best_model_step_4", "checkpoint_step_2", "evaluation_report.json", "final_model", "log.jsonl",
            "train_config.json"]
        records = [json.loads(line) for line in (runs / mode / "log.jsonl").read_text().splitlines()]
        assert [("loss" in r, r["step"]) for r in records] == [(True, 4), (False, 4)]  # written once, not twice
    # the processes ran with cwd=runs: nothing but the output directories appeared there
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "fsdp", "fsdp_shared", "single"]


def test_resume_with_other_pairs_per_step_is_refused(runs, tmp_path):
    out = tmp_path / "ddp"
    shutil.copytree(runs / "ddp", out)
    shutil.rmtree(out / "final_model")  # as if stopped after its checkpoint: a finished run is not resumed
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, "--output_dir", str(out), "--batch_size", "2",
           "--resume", "latest"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    assert "pairs per step" in result.stderr and result.stderr.strip().count("\n") == 0


def test_two_processes_equal_one_on_ranked_groups_of_mixed_k(tmp_path):
    """--loss listwise on groups of 2, 3 and 4 responses: each micro-batch weighs its share of the step's groups
    (both group losses are a mean over groups), so 2 processes x 2 groups equal 1 process x 4 groups."""
    import itertools
    from support.demo import demo_ranked_rows
    rows = []
    for i, row in enumerate(itertools.islice(demo_ranked_rows("train"), 40)):
        k = 2 + i % 3
        rows.append({"prompt": row["prompt"], "responses": row["responses"][:k], "scores": row["scores"][:k]})
    rows = [r for r in rows if len(set(r["scores"])) > 1]
    (tmp_path / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["--dataset", str(tmp_path / "ranked.jsonl"), "--loss", "listwise", "--eval_split", "none"]
    launch(tmp_path / "single", *extra, "--batch_size", "4", procs=1)
    launch(tmp_path / "ddp", *extra, "--batch_size", "2", cwd=tmp_path)
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "ddp")) < 1e-5
