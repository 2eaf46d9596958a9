"""train.py: the demo learns, resume is exact, every option does what it says, bad flags fail cleanly."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, as_if_stopped_at
from train import RUN_CONFIGS, TrainConfig, train


def tiny_cfg(tmp_path, name="run", **kw):
    """A few-second run: the demo's tiny model on 48 demo pairs."""
    base = {**RUN_CONFIGS["demo"], "max_train_samples": 48, "max_eval_samples": 16, "batch_size": 4,
            "max_steps": 4, "eval_steps": 1000, "save_steps": 1000, "logging_steps": 2, "warmup_ratio": 0.0,
            "output_dir": str(tmp_path / name), "progress": False}
    return TrainConfig(**{**base, **kw})


def final_weights(out):
    return load_file(os.path.join(out, "final_model", "model.safetensors"))


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_demo_learns_and_eval_reproduces_its_accuracy(tmp_path):
    """The README's first command: a tiny Qwen3 from scratch learns the synthetic task (>= 90% held out)."""
    cfg = TrainConfig(**{**RUN_CONFIGS["demo"], "output_dir": str(tmp_path / "demo"), "progress": False})
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


def test_every_config_field_is_a_flag_with_its_help_and_the_named_config_underneath():
    """support/cli.py makes one flag per TrainConfig field (aliases, switches and --no_progress included), its
    help the field's; --config NAME supplies the values of the flags not given."""
    import dataclasses
    from train import parse_command_line
    fields = dataclasses.fields(TrainConfig)
    assert all(f.metadata.get("help") for f in fields)
    command = parse_command_line(["--config", "demo", "--model_name", "tiny", "--8bit_optim", "--8bit_model",
                                  "--no_progress", "--resume", "--dataset", "a.jsonl", "b.jsonl", "--lora_rank", "4",
                                  "--eval_fraction", "0.1", "--max_steps", "-1"])
    cfg = command.config
    assert (cfg.model, cfg.optim_8bit, cfg.model_8bit, cfg.progress, cfg.resume, cfg.dataset, cfg.lora_rank,
            cfg.eval_fraction, cfg.max_steps) == ("tiny", True, True, False, "latest", ["a.jsonl", "b.jsonl"], 4,
                                                  0.1, -1)
    assert cfg.learning_rate == RUN_CONFIGS["demo"]["learning_rate"] and cfg.bf16 is False  # the config, the default
    assert command.given == set(RUN_CONFIGS["demo"]) | {"model", "optim_8bit", "model_8bit", "progress", "resume",
                                                        "dataset", "lora_rank", "eval_fraction", "max_steps"}
    assert not command.eval_only and command.model_path is None
    assert parse_command_line([]).config == TrainConfig()  # --config custom: the dataclass's defaults
    assert parse_command_line(["--resume", "run/checkpoint_step_2"]).config.resume == "run/checkpoint_step_2"
    help_text = " ".join(run_cli(["--help"]).stdout.split())
    for f in fields:
        assert " ".join(f.metadata["help"].split()) in help_text, f.name


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


# ---- tests that catch planted one-line bugs (issue 21, section 7) ----------------------------------


def recording_steps(monkeypatch):
    """Record, at every AdamW step (before it updates anything), each trainable parameter and its gradient."""
    steps, real = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        steps.append(([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params]))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return steps


def test_clip_grad_norm_clips_and_returns_the_norm_before_clipping():
    import train as train_module
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    grads = [torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) - 2 for p in model.parameters()]
    before = torch.cat([g.flatten() for g in grads]).norm().item()  # by hand: the global 2-norm
    assert before > 1
    for max_norm in (0.5, 0.0, 2 * before):  # clipped; 0 = off; a bound above the norm changes nothing
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        returned = train_module.clip_grad_norm(model, max_norm)
        assert abs(float(returned) - before) < 1e-4 * before
        after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        if max_norm == 0.5:
            assert after <= 0.5 * (1 + 1e-5) and abs(after - 0.5) < 1e-4
            assert all(torch.allclose(p.grad, g * (0.5 / before), rtol=1e-5) for p, g in zip(model.parameters(), grads))
        else:
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_the_training_loop_steps_with_clipped_gradients_and_logs_the_norm_before(tmp_path, monkeypatch):
    """At every optimizer step of a run the gradient norm is at most --max_grad_norm; log.jsonl's grad_norm
    is the norm before clipping (above the bound here, so clipping happened)."""
    steps = recording_steps(monkeypatch)
    result = train(tiny_cfg(tmp_path, "clip", max_grad_norm=0.05, max_steps=3, logging_steps=1))
    logged = [h["grad_norm"] for h in result["history"] if "grad_norm" in h]
    assert len(steps) == len(logged) == 3
    for (_, grads), norm in zip(steps, logged):
        stepped = torch.cat([g.flatten() for g in grads]).norm().item()
        assert norm > 0.05 and stepped <= 0.05 * (1 + 1e-5) and abs(stepped - 0.05) < 1e-4, (norm, stepped)


def test_accumulation_with_a_short_last_micro_batch_equals_one_big_batch(tmp_path, monkeypatch):
    """46 pairs, 12 per step as 3 micro-batches of 4: the last step's micro-batches hold 4, 4 and 2 pairs.
    Its gradient must be that of the mean loss over its 10 pairs, computed here by hand in one batch."""
    import torch.nn.functional as F

    import train as train_module
    from support.packing import choose_collate
    steps = recording_steps(monkeypatch)
    cfg = tiny_cfg(tmp_path, "accum", max_train_samples=46, batch_size=4, gradient_accumulation_steps=3,
                   max_steps=4, max_grad_norm=0.0, learning_rate=1e-3)
    train(cfg)
    model = train_module.build_model(cfg)
    items = train_module.load_data(cfg, model.tokenizer)[0]
    batches = train_module.StepBatches(items, 12, cfg.seed)
    assert [len(idx) for idx, _ in batches.micro_batches(3, 4, 0, 1)] == [4, 4, 2]
    assert [w for _, w in batches.micro_batches(3, 4, 0, 1)] == [0.4, 0.4, 0.2]  # shares of the step's 10 pairs
    # 2 processes x batch 4 (8 pairs per micro-step): the step's 10 pairs as 8 + 2; rank 1's slice of the
    # short one is 1 pair. 3 processes x batch 3: 9 + 1, and rank 2 has none of the 1: a stand-in pair, weight 0
    assert [w for _, w in batches.micro_batches(3, 4, 1, 2)] == [4 / 10 * 2, 1 / 10 * 2]
    assert batches.micro_batches(3, 3, 2, 3)[-1] == ([0], 0.0)
    (idx, _), = batches.micro_batches(3, 12, 0, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    params = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]  # make_optimizer's order
    before, grads = steps[3]
    with torch.no_grad():
        for p, v in zip(params, before):
            p.copy_(v)
    batch = choose_collate(False, False)([items[j] for j in idx], model.tokenizer.pad_id)
    assert batch.margin is None or not batch.margin.any()
    chosen, rejected = model(batch.input_ids, batch.attention_mask, batch.layout).chunk(2)
    (-F.logsigmoid(chosen - rejected).mean()).backward()  # the mean over all 10 pairs, one batch
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_resume_of_a_run_that_draws_random_numbers_is_exact(tmp_path, monkeypatch):
    """A run whose steps draw from torch's, numpy's and python's generators (here: noise on the loss) resumes
    exactly only if the checkpoint restores each generator's state."""
    import random

    import numpy as np

    import train as train_module
    real = train_module.pairwise_loss

    def noisy(*args, **kwargs):
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * (1 + 0.5 * torch.rand(()) + 0.5 * np.random.rand() + 0.5 * random.random())
        return out
    monkeypatch.setattr(train_module, "pairwise_loss", noisy)
    kw = dict(max_steps=6, save_steps=3, learning_rate=1e-2)
    train(tiny_cfg(tmp_path, "full", **kw))
    out = as_if_stopped_at(tmp_path / "full", tmp_path / "resumed")
    for seed in (1, 2, 3):  # whatever the generators hold before the resume must not matter
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    train(tiny_cfg(tmp_path, "resumed", resume="latest", **kw))
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_file_a_run_writes_follows_the_umask(tmp_path):
    """Weights (model.safetensors, optimizer.safetensors, LoRA's adapter_model.safetensors) were written
    0600 while every other file followed the umask: a server under another user could not read the model.
    Under umask 027 every file of a run, checkpoints and final model included, is 0640 (not 0644 or 0600)."""
    old = os.umask(0o027)
    try:
        train(tiny_cfg(tmp_path, "full", max_steps=2, save_steps=1, save_total_limit=1))
        train(tiny_cfg(tmp_path, "lora", max_steps=2, save_steps=1, save_total_limit=1, lora_rank=2,
                       save_adapters=True, head="linear"))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")
             if p.is_file() and p.name != ".lock"}
    for weights in ("full/final_model/model.safetensors", "full/checkpoint_step_1/optimizer.safetensors",
                    "lora/checkpoint_step_1/adapters/rm_adapters.safetensors",
                    "lora/final_adapters/adapter_model.safetensors", "lora/final_model/model.safetensors"):
        assert weights in modes
    assert set(modes.values()) == {"0o640"}, modes


def tensorboard_scalars(log_dir) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard shows them (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def log_scalars(out) -> dict:
    """log.jsonl as {name: [(step, value), ...]}: the numbers TensorBoard should show."""
    scalars = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name != "step" and type(value) in (int, float):
                scalars.setdefault(name, []).append((record["step"], value))
    return scalars


def assert_same_scalars(tensorboard: dict, log: dict):
    assert tensorboard.keys() == log.keys() and "loss" in log and "eval_accuracy" in log
    for name, points in log.items():  # event files hold float32
        assert [s for s, _ in tensorboard[name]] == [s for s, _ in points], name
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(tensorboard[name], points)), name


def test_report_to_tensorboard_scalars_equal_log_jsonl_and_a_resume_purges_the_steps_it_trains_again(tmp_path):
    pytest.importorskip("tensorboard")
    kw = dict(report_to="tensorboard", max_steps=6, save_steps=3, eval_steps=3, logging_steps=2)
    train(tiny_cfg(tmp_path, "full", **kw))
    full = tmp_path / "full"
    assert_same_scalars(tensorboard_scalars(full / "tensorboard"), log_scalars(full))
    # killed after step 6 logged, resumed from checkpoint_step_3: steps 4-6 are trained and logged again, once
    resumed = as_if_stopped_at(full, tmp_path / "resumed")
    import shutil
    shutil.copytree(full / "tensorboard", resumed / "tensorboard")
    shutil.copy(full / "log.jsonl", resumed / "log.jsonl")
    train(tiny_cfg(tmp_path, "resumed", resume="latest", **kw))
    assert_same_scalars(tensorboard_scalars(resumed / "tensorboard"), log_scalars(resumed))
    assert [step for step, _ in tensorboard_scalars(resumed / "tensorboard")["loss"]] == [2, 4, 6]  # no step twice


@pytest.mark.parametrize("report_to", ["tensorbord", "", "none,tensorboard,x"])
def test_report_to_an_unknown_name_is_one_line(tmp_path, report_to):
    from support.errors import UserError
    with pytest.raises(UserError, match="--report_to .*choose from none, tensorboard, wandb") as e:
        train(tiny_cfg(tmp_path, report_to=report_to))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_finished_run_resumed_with_more_steps_trains_further_as_any_resume(tmp_path):
    """--resume of a finished run with a larger --max_steps (it was refused as complete): it continues from
    the newest checkpoint on this run's schedule, exactly as a run stopped after that checkpoint and resumed
    with the same flags, and the new final_model/ and evaluation_report.json replace the old ones."""
    train(tiny_cfg(tmp_path, "done", max_steps=4, save_steps=3, eval_steps=2))
    as_if_stopped_at(tmp_path / "done", tmp_path / "stopped")
    old = final_weights(tmp_path / "done")
    extended = train(tiny_cfg(tmp_path, "done", max_steps=7, save_steps=3, eval_steps=2, resume="latest"))
    resumed = train(tiny_cfg(tmp_path, "stopped", max_steps=7, save_steps=3, eval_steps=2, resume="latest"))
    a, b = final_weights(tmp_path / "done"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], old[k]) for k in a)
    steps = [h["step"] for h in extended["history"]]  # log.jsonl cut back to step 3: each step logged once
    assert extended["step"] == 7 and steps == [2, 2] + [h["step"] for h in resumed["history"]] == [2, 2, 4, 4, 6, 6, 7, 7]
    report = json.loads((tmp_path / "done" / "evaluation_report.json").read_text())
    assert report["accuracy"] == extended["eval_accuracy"] == resumed["eval_accuracy"]
