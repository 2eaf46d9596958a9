"""train.py: the demo learns, resume is exact, every option does what it says, bad flags fail cleanly."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, as_if_stopped_at
from train import CONFIGS, TrainConfig, train


def tiny_cfg(tmp_path, name="run", **kw):
    """A few-second run: the demo's tiny model on 48 demo pairs."""
    base = {**CONFIGS["demo"], "max_train_samples": 48, "max_eval_samples": 16, "batch_size": 4,
            "max_steps": 4, "eval_steps": 1000, "save_steps": 1000, "logging_steps": 2, "warmup_ratio": 0.0,
            "output_dir": str(tmp_path / name), "progress": False}
    return TrainConfig(**{**base, **kw})


def final_weights(out):
    return load_file(os.path.join(out, "final_model", "model.safetensors"))


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_demo_learns_and_eval_reproduces_its_accuracy(tmp_path):
    """The README's first command: a tiny Qwen3 from scratch learns the synthetic task (>= 90% held out)."""
    cfg = TrainConfig(**{**CONFIGS["demo"], "output_dir": str(tmp_path / "demo"), "progress": False})
    result = train(cfg)
    assert result["eval_accuracy"] >= 0.90, result["eval_accuracy"]
    report = json.loads((tmp_path / "demo" / "evaluation_report.json").read_text())
    assert report["accuracy"] == result["eval_accuracy"]
    # eval.py on the saved model, with the dataset and max length recorded in its config, says the same
    out = subprocess.run([sys.executable, "eval.py", str(tmp_path / "demo"), "--max_samples",
                          str(cfg.max_eval_samples), "--output", str(tmp_path / "report.json")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "report.json").read_text())
    assert abs(again["accuracy"] - result["eval_accuracy"]) < 1e-9


@pytest.mark.parametrize("optim_8bit", [False, True], ids=["adamw", "adamw8bit"])
def test_resume_is_bitwise_exact(tmp_path, optim_8bit):
    full = train(tiny_cfg(tmp_path, "full", max_steps=6, save_steps=3, gradient_accumulation_steps=2,
                          optim_8bit=optim_8bit))
    # The same run, stopped after its step-3 checkpoint: keep only that checkpoint, then --resume.
    out = tmp_path / "resumed"
    as_if_stopped_at(tmp_path / "full", out)
    resumed = train(tiny_cfg(tmp_path, "resumed", max_steps=6, save_steps=3, gradient_accumulation_steps=2,
                             optim_8bit=optim_8bit, resume="latest"))
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    def after_resume(history):  # the first log window after step 3 differs (it starts at the resume)
        return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "peak_mem_gib")}
                for h in history if h["step"] > 4]
    assert after_resume(full["history"]) == after_resume(resumed["history"]) != []


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # lr 1e-4: Adam divides by sqrt(v), so float-rounding differences in near-zero gradients move
    # weights by up to ~lr; at 1e-4 that stays well inside the tolerance.
    train(tiny_cfg(tmp_path, "big", batch_size=8, max_steps=3, learning_rate=1e-4))
    train(tiny_cfg(tmp_path, "accum", batch_size=4, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-4))
    assert max_diff(final_weights(tmp_path / "big"), final_weights(tmp_path / "accum")) < 1e-5


def test_gradient_checkpointing_same_weights(tmp_path):
    train(tiny_cfg(tmp_path, "plain"))
    train(tiny_cfg(tmp_path, "ckpt", gradient_checkpointing=True))
    assert max_diff(final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")) < 1e-6


def test_freeze_layers_leaves_them_unchanged(tmp_path):
    train(tiny_cfg(tmp_path, "init", max_steps=1, learning_rate=1e-12))   # ~ the initial weights
    train(tiny_cfg(tmp_path, "frozen", freeze_layers=1, learning_rate=1e-2))
    a, b = final_weights(tmp_path / "init"), final_weights(tmp_path / "frozen")
    for k in a:
        frozen = k.startswith(("model.embed_tokens", "model.layers.0."))
        assert (max_diff({k: a[k]}, {k: b[k]}) < 1e-9) == frozen, k


def test_8bit_optimizer_state_is_uint8(tmp_path):
    train(tiny_cfg(tmp_path, "opt8", optim_8bit=True, save_steps=2, max_steps=3))
    state = load_file(tmp_path / "opt8" / "checkpoint_step_2" / "optimizer.safetensors")  # every tensor of it
    moments = [v for k, v in state.items() if k.startswith("s.optimizer.state.") and v.numel() >= 4096]
    assert moments and all(v.dtype == torch.uint8 for v in moments)  # Adam's m and v, one byte each


def test_8bit_model_trains_only_head_and_norms(tmp_path):
    train(tiny_cfg(tmp_path, "init", max_steps=1, learning_rate=1e-12))
    train(tiny_cfg(tmp_path, "q8", model_8bit=True, learning_rate=1e-2))
    a, b = final_weights(tmp_path / "init"), final_weights(tmp_path / "q8")
    for k in a:
        changed = (a[k] - b[k]).abs().max().item()
        if "norm" in k or k.startswith("reward_head"):
            assert changed > 1e-4, k
        else:
            assert changed < 0.02 * a[k].abs().max().item(), k  # int8 rounding only


def test_bf16_autocast_on_cpu_keeps_fp32_master_weights(tmp_path):
    result = train(tiny_cfg(tmp_path, "bf16", bf16=True))
    assert all(v.dtype == torch.float32 for v in final_weights(tmp_path / "bf16").values())
    assert all(h["loss"] == h["loss"] for h in result["history"] if "loss" in h)


def test_checkpoint_layout_and_save_total_limit(tmp_path):
    train(tiny_cfg(tmp_path, "ckpts", max_steps=7, save_steps=2, save_total_limit=2, eval_steps=3))
    out = tmp_path / "ckpts"
    names = sorted(p.name for p in out.iterdir())
    best = [n for n in names if n.startswith("best_model_step_")]
    assert len(best) == 1 and best[0] in ("best_model_step_3", "best_model_step_6", "best_model_step_7")  # evals
    assert [n for n in names if n not in best] == [".lock", "checkpoint_step_4", "checkpoint_step_6",
                                                   "evaluation_report.json", "final_model", "log.jsonl",
                                                   "train_config.json"]
    ckpt = out / "checkpoint_step_6"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model", "optimizer.json", "optimizer.safetensors",
                                                       "trainer_state.json"]
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == \
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6


def run_cli(args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("flag,message", [
    (["--batch_size", "0"], "--batch_size must be a positive integer"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
])
def test_bad_flag_one_line_and_no_output_dir(tmp_path, flag, message):
    out = run_cli(["--config", "demo", "--output_dir", str(tmp_path / "o"), *flag])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr
    assert not (tmp_path / "o").exists()


def test_eval_dataset_and_no_evaluation(tmp_path):
    """A local file has no splits: --eval_dataset names the held-out file, --eval_split none skips eval."""
    import data
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            for p in data.load_pairs("demo", split="train", max_samples=40)]
    held = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            for p in data.load_pairs("demo", split="test", max_samples=10)]
    for name, rs in (("train.jsonl", rows), ("held.jsonl", held)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    result = train(tiny_cfg(tmp_path, "held", dataset=[str(tmp_path / "train.jsonl")],
                            eval_dataset=[str(tmp_path / "held.jsonl")], max_eval_samples=None))
    report = json.loads((tmp_path / "held" / "evaluation_report.json").read_text())
    assert report["num_pairs"] == 10 and report["dataset"] == [str(tmp_path / "held.jsonl")]
    assert "eval_accuracy" in result
    result = train(tiny_cfg(tmp_path, "noeval", dataset=[str(tmp_path / "train.jsonl")], eval_split="none"))
    assert "eval_accuracy" not in result and (tmp_path / "noeval" / "final_model" / "model.safetensors").exists()
    assert not (tmp_path / "noeval" / "evaluation_report.json").exists()
