"""What --resume may change (and what it refuses), a held-out share that never holds a training pair, and
output directories that would break a dataset or a model directory. Issue 14, sections 5, 7 and 8."""
import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import torch

import data
import eval as eval_cli
import train
from support import validate
from support.checkpoint import MAY_CHANGE, SAME_RUN
from support.metrics import significant
from support.errors import UserError
from test_train import tiny_cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_pairs(path, split="train", n=60, start=0):
    pairs = data.load_pairs("demo", split=split, max_samples=start + n)[start:]
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


# ---- what --resume may change -------------------------------------------------------------------


def test_every_config_field_has_a_resume_policy():
    """A new TrainConfig field must be put in checkpoint.SAME_RUN (refused) or MAY_CHANGE (honoured)."""
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert not set(SAME_RUN) & set(MAY_CHANGE)
    assert set(SAME_RUN) | set(MAY_CHANGE) == fields, fields ^ (set(SAME_RUN) | set(MAY_CHANGE))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 4-step run with a checkpoint at step 2; refused resumes write nothing, so it is shared."""
    root = tmp_path_factory.mktemp("stopped")
    train.train(tiny_cfg(root, "run", save_steps=2))
    shutil.rmtree(root / "run" / "final_model")  # as if stopped after its checkpoint: a finished run is complete
    return root


@pytest.mark.parametrize("change", [dict(seed=7), dict(max_length=96), dict(max_train_samples=40),
                                    dict(head="linear"), dict(freeze_layers=1), dict(max_eval_samples=8),
                                    dict(eval_split="none"), dict(optim_8bit=True)])
def test_resume_refuses_a_changed_run_setting(stopped_run, change):
    before = sorted(p.name for p in (stopped_run / "run").iterdir())
    with pytest.raises(UserError) as e:
        train.train(tiny_cfg(stopped_run, "run", save_steps=2, resume="latest", **change))
    (key, value), = change.items()
    message = str(e.value)
    assert message.startswith("--resume: the checkpoint was trained with other settings: ") and "\n" not in message
    assert f"{key} (" in message and f"-> {value!r})" in message, message
    assert sorted(p.name for p in (stopped_run / "run").iterdir()) == before


def test_resume_applies_a_new_learning_rate_weight_decay_and_length(tmp_path, monkeypatch):
    """The learning rate and weight decay each optimizer step used: the old ones up to the checkpoint, then
    the new peak rate on the new schedule (longer: max_steps 6 -> 8) and the new weight decay, from the
    first resumed step on. train_config.json and the new checkpoints record the new values."""
    used, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append((self.param_groups[0]["lr"], self.param_groups[1]["lr"], self.param_groups[0]["weight_decay"]))
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    common = dict(save_steps=3, warmup_ratio=0.34, logging_steps=1)
    train.train(tiny_cfg(tmp_path, "run", max_steps=6, learning_rate=1e-3, weight_decay=0.0, **common))
    shutil.rmtree(tmp_path / "run" / "final_model")
    first = used[:3]
    used.clear()
    result = train.train(tiny_cfg(tmp_path, "run", max_steps=8, learning_rate=4e-4, weight_decay=0.1,
                                  resume=str(tmp_path / "run" / "checkpoint_step_3"), **common))
    old, new = train.lr_lambda(6, int(0.34 * 6)), train.lr_lambda(8, int(0.34 * 8))
    assert first == [(1e-3 * old(s), 1e-3 * old(s), 0.0) for s in range(3)]
    assert used == [(4e-4 * new(s), 4e-4 * new(s), 0.1) for s in range(3, 8)]
    assert result["step"] == 8
    # log.jsonl records the rate each step used (as TRL), the very rates the optimizer got
    assert [h["lr"] for h in result["history"] if "lr" in h][3:] == [significant(4e-4 * new(s)) for s in range(3, 8)]
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (config["learning_rate"], config["weight_decay"], config["max_steps"]) == (4e-4, 0.1, 8)
    state = json.loads((tmp_path / "run" / "checkpoint_step_6" / "trainer_state.json").read_text())
    assert state["config"]["learning_rate"] == 4e-4 and state["total_steps"] == 8


def test_resume_refuses_a_run_that_would_end_before_the_checkpoint(stopped_run):
    with pytest.raises(UserError, match=r"^--resume: the checkpoint is at step 2 and this run ends at step 2 "):
        train.train(tiny_cfg(stopped_run, "run", save_steps=2, resume="latest", max_steps=2))


def test_nan_advice_resume_with_a_lower_learning_rate_works(tmp_path, monkeypatch):
    """The NaN message's advice, followed as written: --resume CHECKPOINT --learning_rate LOWER."""
    real, calls = train.pairwise_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(train, "pairwise_loss", poisoned)
    with pytest.raises(UserError) as e:
        train.train(tiny_cfg(tmp_path, "run", save_steps=2, learning_rate=1e-3))
    ckpt = tmp_path / "run" / "checkpoint_step_2"
    assert f"Resume from it with a lower learning rate (the same flags and --resume {ckpt} --learning_rate " \
           "LOWER" in str(e.value)
    result = train.train(tiny_cfg(tmp_path, "run", save_steps=2, learning_rate=5e-4, resume=str(ckpt)))
    assert result["step"] == 4
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["learning_rate"] == 5e-4


def test_resume_notices_changed_training_data(tmp_path, capsys):
    """Touched (same pairs): a one-line warning, and the run goes on. Another row, or other content in the
    same number of rows: refused in one line."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=40)
    cfg = dict(dataset=[str(pairs)], eval_split="none", save_steps=2)
    train.train(tiny_cfg(tmp_path, "run", **cfg))
    shutil.rmtree(tmp_path / "run" / "final_model")
    state = json.loads((tmp_path / "run" / "checkpoint_step_2" / "trainer_state.json").read_text())
    assert state["data"]["train_pairs"] == 40 and list(state["data"]["files"]) == [str(pairs.resolve())]
    text = pairs.read_text()

    pairs.write_text(text + text.splitlines(keepends=True)[0].replace("Assistant:", "Assistant: well,"))
    with pytest.raises(UserError) as e:
        train.train(tiny_cfg(tmp_path, "run", resume="latest", **cfg))
    assert str(e.value).startswith("--resume: the training data changed since the run started (40 -> 41 pairs; "
                                   f"changed: {pairs.resolve()} (size ") and "\n" not in str(e.value)

    pairs.write_text(text.replace("Assistant:", "Assistant;", 1))
    with pytest.raises(UserError, match=r"\(40 -> 40 pairs, other content; changed: .*modified\)"):
        train.train(tiny_cfg(tmp_path, "run", resume="latest", **cfg))

    pairs.write_text(text)  # the same bytes again, a newer modification time
    capsys.readouterr()
    assert train.train(tiny_cfg(tmp_path, "run", resume="latest", **cfg))["step"] == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: --resume: data file(s) changed since the run started: {pairs.resolve()} "
                        "(modified); the training pairs read are the same, so the run continues"]


# ---- held-out pairs -----------------------------------------------------------------------------


def test_held_out_share_is_a_hash_of_the_pair_content():
    pairs = data.load_pairs("demo", split="train", max_samples=400)
    pairs = pairs + [dataclasses.replace(p, source="elsewhere") for p in pairs[:50]]  # duplicates, other source
    kept, held = data.split_held_out(pairs, 0.1)
    keys = lambda ps: {data.pair_key(p) for p in ps}  # noqa: E731
    assert not keys(kept) & keys(held) and len(kept) + len(held) == len(pairs)
    assert 20 <= len(held) <= 70  # ~10% of 450
    # by hand: the first 8 bytes of blake2b over "prompt\0chosen\0rejected", as a fraction of 2**64
    by_hand = [p for p in pairs if int.from_bytes(hashlib.blake2b(
        f"{p.prompt}\0{p.chosen}\0{p.rejected}".encode(), digest_size=8).digest(), "big") < 0.1 * 2**64]
    assert held == by_hand
    assert data.split_held_out(pairs[::-1], 0.1)[1] == held[::-1]  # per pair, not per position


def test_training_file_without_eval_data_holds_out_a_share(tmp_path, capsys):
    """`--dataset train.jsonl` alone: 5% of its pairs are held out (announced), none of them trained on;
    the final report says so, and eval.py on the run defaults to the same pairs with the same accuracy."""
    pairs = write_pairs(tmp_path / "train.jsonl", n=400)
    cfg = tiny_cfg(tmp_path, "run", dataset=[str(pairs)], max_train_samples=None, max_eval_samples=None)
    tokenizer = train.build_model(cfg).tokenizer
    train_items, held_out, _ = train.load_data(dataclasses.replace(cfg), tokenizer)
    ids = lambda items: {(tuple(it.chosen_ids), tuple(it.rejected_ids)) for it in items}  # noqa: E731
    assert held_out.items and not ids(train_items) & ids(held_out.items)
    assert len(train_items) + len(held_out.items) == 400 and len(held_out.items) < 40
    capsys.readouterr()
    result = train.train(cfg)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
    n = len(held_out.items)
    assert line.startswith(f"data: {400 - n} training pairs, {n} eval pairs (held out of the training pairs by "
                           "content hash: --eval_fraction 0.05) | "), line
    report = json.loads((tmp_path / "run" / "evaluation_report.json").read_text())
    assert (report["num_pairs"], report["split"], report["eval_fraction"]) == (n, "train", 0.05)
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (config["eval_fraction"], config["eval_split"]) == (0.05, "train")
    again = eval_cli.main([str(tmp_path / "run"), "--output", str(tmp_path / "again.json"), "--device", "cpu"])
    assert (again["num_pairs"], again["accuracy"], again["eval_fraction"]) == (n, result["eval_accuracy"], 0.05)
    capsys.readouterr()
    eval_cli.main([str(tmp_path / "run"), "--dataset", str(pairs), "--output", str(tmp_path / "all.json"),
                   "--device", "cpu"])  # asked for explicitly: evaluated, with a note
    assert "include the model's training data" in capsys.readouterr().err


def test_eval_fraction_given_and_its_contradictions(tmp_path):
    a, b = write_pairs(tmp_path / "a.jsonl", n=30), write_pairs(tmp_path / "b.jsonl", n=30, start=30)
    base = dict(dataset=[str(a), str(b)], max_train_samples=None, max_eval_samples=None)
    cfg = tiny_cfg(tmp_path, "run", eval_fraction=0.3, **base)
    train_items, held_out, _ = train.load_data(cfg, train.build_model(cfg).tokenizer)
    assert len(held_out.items) == len(data.split_held_out(data.load_pairs([str(a), str(b)]), 0.3)[1]) > 0
    refusals = [(dict(eval_dataset=[str(b)]), "the evaluation data (" + str(b) + ", split test) includes training "
                 "files (" + str(b.resolve()) + "), so its accuracy would not be held out; pass held-out files"),
                (dict(eval_fraction=0.1, eval_dataset=[str(b)]), "--eval_fraction holds out a share of the training "
                 "pairs: it contradicts --eval_dataset; pick one"),
                (dict(eval_fraction=0.1, eval_split="none"), "it contradicts --eval_split none; pick one"),
                (dict(eval_fraction=1.5), "--eval_fraction must be between 0 and 1 (got 1.5)"),
                (dict(eval_fraction=1e-9), "--eval_fraction 1e-09 holds out 0 of the 60 pairs of " + str(a) + ", " + str(b) + ", leaving nothing to "
                 "evaluate; pass held-out files with --eval_dataset, another --eval_fraction, or --eval_split none")]
    for change, message in refusals:
        with pytest.raises(UserError) as e:
            train.train(tiny_cfg(tmp_path, "refused", **{**base, **change}))
        assert message in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "refused").exists()


# ---- output directories that would do harm ------------------------------------------------------


def test_output_dir_inside_a_dataset_directory_or_the_model_directory_is_refused(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_pairs(d / "train_v2.jsonl", n=10)
    model = tmp_path / "model"
    model.mkdir()
    cases = [(dict(dataset=[str(d)], output_dir=str(d)), f"--output_dir {d} is inside the dataset directory {d}"),
             (dict(dataset=[str(d)], output_dir=str(d / "run")), "is inside the dataset directory"),
             (dict(dataset=[str(d / "*.jsonl")], output_dir=str(d)), "is inside the dataset directory"),
             (dict(eval_dataset=[str(d) + "/"], output_dir=str(d / "x" / "..")), "is inside the dataset directory"),
             (dict(model=str(model), from_scratch=False, output_dir=str(model) + "/"),
              f"--output_dir {model}/ is the --model directory")]
    for change, message in cases:
        with pytest.raises(UserError) as e:
            validate.validate(tiny_cfg(tmp_path, **change))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    # a data FILE next to the output directory, whatever its name, is fine
    validate.validate(tiny_cfg(tmp_path, dataset=[str(d / "*.jsonl")], output_dir=str(d / "run")))  # not read
    validate.validate(tiny_cfg(tmp_path, dataset=[str(d / "train_v2.jsonl")], output_dir=str(d / "run")))
    validate.validate(tiny_cfg(tmp_path, model=str(model), from_scratch=False, output_dir=str(model / "run")))
    assert sorted(os.listdir(d)) == ["train_v2.jsonl"]
