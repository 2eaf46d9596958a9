"""Hardening: bad input ends in one clear line (exit 2, nothing written), faults lose nothing, long runs
stay bounded.

- test_bad_input: the README's troubleshooting table, case by case, through the real CLIs (python train.py,
  python eval.py) as subprocesses, two at a time; test_bad_input_in_process: more variants, through
  errors.run_cli(main) in this process. Each case: exit status 2, ONE line on stderr starting "error:"
  that names the problem and what to do, no traceback, and the output directory (or report) left exactly
  as it was (absent if it was absent).
- SIGKILL at random moments (in checkpoint writes too): a loadable last checkpoint is always there, and
  --resume ends with the same weights as an uninterrupted run, bitwise. SIGINT/SIGTERM: checkpoint, a
  resume line that works, exit status 128 + signal; a second SIGINT: out at once (130), the pending
  checkpoint abandoned without a trace, the last complete one named.
- Under torchrun, a refusal that only rank 0 checks ends every process at once (status 2, one line).
- NaN/inf loss or gradient, disk full (simulated and, where a tmpfs can be mounted, real): one line, the
  last good checkpoint intact. A corrupt row mid-file: skipped and counted, training goes on.
- Long runs: host RSS flat over a few hundred steps, checkpoints of constant size, --save_total_limit holds.
"""
import errno
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, as_if_stopped_at, save_hf_model, small_tmpfs

import train
from support import checkpoint, validate
from support.checkpoint import checkpoint_dirs
from support.errors import UserError
from rm import RewardModel

# Subprocesses: offline, no Hub cache, one thread each (two run at a time on two cores).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("RM_DEBUG", None)
# A CLI run with some modules made unimportable (sys.modules[name] = None), the script run as __main__.
RUNNER = ("import runpy, sys; sys.argv.pop(0); blocked = sys.argv.pop(1).split(','); "
          "sys.modules.update({m: None for m in blocked}); runpy.run_path(sys.argv[0], run_name='__main__')")
TINY = ["--max_train_samples", "8", "--max_eval_samples", "8", "--max_steps", "1", "--no_progress"]
DEMO = ["--config", "demo", *TINY]
LONG = "x" * 300  # a file name over the 255 bytes file systems allow
ON_MODEL = ["--dataset", "demo", "--device", "cpu", *TINY]   # with --model DIR (not from scratch)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here: the models are tiny, and two spinning OpenMP threads on a busy 2-core
    machine made these runs 10-25x slower (measured). Restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_rows(n, split="train"):
    from support.demo import demo_rows as all_demo_rows
    rows = []
    for row in all_demo_rows(split):
        rows.append(row)
        if len(rows) == n:
            return rows


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def save_reward_model(path, vocab_delta=0):
    """A tiny reward model in our format, with the demo tokenizer (what train.py writes)."""
    import dataclasses
    from support.demo import demo_tokenizer
    from qwen3 import SHAPES
    tok = demo_tokenizer()
    model = RewardModel(dataclasses.replace(SHAPES["tiny"], vocab_size=tok.vocab_size + vocab_delta))
    model.model.init_weights(seed=0)
    model.init_head(0)
    model.tokenizer = tok
    model.provenance = {"dataset": ["demo"], "max_length": 128}
    model.save_pretrained(path)
    return path


def variant(src, dst, edit):
    shutil.copytree(src, dst)
    edit(Path(dst))
    return dst


def edit_tensors(fn):
    def edit(d):
        state = load_file(d / "model.safetensors")
        fn(state)
        save_file(state, d / "model.safetensors")
    return edit


def edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def edit_reward_model(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["reward_model"].update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def cli_config(*argv):
    """The TrainConfig that `python train.py ARGV` runs with."""
    return train.parse_command_line([str(a) for a in argv]).config


def snapshot(path: Path):
    """Everything under `path` (names; sizes and mtimes of files), or None if it does not exist."""
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), *((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ()))
                  for p in [path, *path.rglob("*")])


# A finished tiny run (2 steps, a checkpoint after step 1), made in-process with the CLI's own parser.
DONE = ["--config", "demo", "--max_train_samples", "8", "--max_eval_samples", "8", "--max_steps", "2",
        "--save_steps", "1", "--eval_steps", "1000", "--logging_steps", "1", "--batch_size", "4", "--no_progress"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Every bad input of the table, built once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("bad")
    f = {"root": root}
    # models
    good = f["good_model"] = save_reward_model(root / "good_model")
    (root / "empty_dir").mkdir()
    f["empty_dir"] = root / "empty_dir"
    f["not_qwen3"] = variant(good, root / "not_qwen3", edit_config(model_type="llama"))
    f["bad_config_json"] = variant(good, root / "bad_config_json",
                                   lambda d: (d / "config.json").write_text('{"model_type": "qwen3", '))
    f["no_weights"] = variant(good, root / "no_weights", lambda d: (d / "model.safetensors").unlink())
    f["corrupt_st"] = variant(good, root / "corrupt_st",
                              lambda d: (d / "model.safetensors").write_bytes(b"\x07garbage" * 500))
    f["truncated_st"] = variant(good, root / "truncated_st", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:20000]))
    f["missing_tensor"] = variant(good, root / "missing_tensor",
                                  edit_tensors(lambda s: s.pop("model.norm.weight")))
    f["misshaped_tensor"] = variant(good, root / "misshaped_tensor",
                                    edit_tensors(lambda s: s.update({"model.norm.weight": torch.ones(7)})))
    for name, edit in {"kv_heads_0": edit_config(num_key_value_heads=0), "hidden_str": edit_config(hidden_size="64"),
                       "vocab_neg": edit_config(vocab_size=-5), "layers_float": edit_config(num_hidden_layers=2.5),
                       "layers_200k": edit_config(num_hidden_layers=200_000),
                       "config_list": lambda d: (d / "config.json").write_text("[1, 2]"),
                       "config_vs_weights": edit_config(vocab_size=1000),
                       "rm_not_object": edit_config(reward_model="mlp"),
                       "rm_max_length": edit_reward_model(max_length="long"),
                       "rm_head_list": edit_reward_model(head=["mlp"]), "rm_pooling_int": edit_reward_model(pooling=3),
                       "unexpected_tensor": edit_tensors(lambda s: s.update({"model.extra.weight": torch.ones(4)})),
                       # the right shape, but integers or bools: not weights
                       "int_tensor": edit_tensors(lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)})),
                       "bool_tensor": edit_tensors(lambda s: s.update({"reward_head.fc2.weight": s["reward_head.fc2.weight"] > 0})),
                       }.items():
        f[name] = variant(good, root / name, edit)
    f["stats_overflow"] = variant(good, root / "stats_overflow",  # 10**400: an OverflowError as a float
                                  edit_reward_model(reward_stats={"mean": 10**400, "std": 1.0, "n": 10}))
    f["not_utf8"] = variant(good, root / os.fsdecode(b"model-\xff"), lambda d: None)  # a Latin-1 name, say
    f["no_tokenizer"] = variant(good, root / "no_tokenizer", lambda d: (d / "tokenizer.json").unlink())
    f["corrupt_tokenizer"] = variant(good, root / "corrupt_tokenizer",
                                     lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": '))
    f["foreign_tokenizer"] = save_reward_model(root / "foreign_tokenizer", vocab_delta=-10)
    f["causal_lm"] = root / "causal_lm"
    save_hf_model(f["causal_lm"])                          # a plain transformers Qwen3ForCausalLM
    (root / "hf_cache").mkdir()
    # data
    rows = demo_rows(12)
    f["csv"] = root / "pairs.csv"
    f["csv"].write_text("prompt,chosen,rejected\na,b,c\n")
    f["corrupt_parquet"] = root / "corrupt.parquet"
    f["corrupt_parquet"].write_bytes(b"PAR1" + os.urandom(300))
    f["parquet_columns"] = root / "columns.parquet"
    pq.write_table(pa.table({"question": ["q"] * 3, "answer": ["a"] * 3}), f["parquet_columns"])
    f["jsonl_columns"] = write_jsonl(root / "columns.jsonl", [{"text": "hello", "label": 1}] * 3)
    f["empty"] = write_jsonl(root / "empty.jsonl", [])
    f["all_bad"] = write_jsonl(root / "all_bad.jsonl", [{"chosen": r["chosen"], "rejected": r["chosen"]} for r in rows]
                               + [{"chosen": None, "rejected": "x"}])
    f["wrong_types"] = write_jsonl(root / "wrong_types.jsonl",
                                   [{"chosen": {"text": "hi"}, "rejected": 3}] * 4)
    huge = " ".join(["the key ideas are stars and planets."] * 300)
    f["huge"] = write_jsonl(root / "huge.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " " + huge,
                                                   "rejected": " whatever. " + huge}] * 5)
    splits = root / "splits"
    splits.mkdir()
    write_jsonl(splits / "train.jsonl", rows)
    write_jsonl(splits / "test.jsonl", rows)
    f["splits"] = splits
    long_eval = root / "long_eval"
    long_eval.mkdir()
    write_jsonl(long_eval / "train.jsonl", rows)
    shutil.copy(f["huge"], long_eval / "test.jsonl")
    f["long_eval"] = long_eval
    f["truncated_gz"] = root / "pairs.jsonl.gz"
    import gzip
    f["truncated_gz"].write_bytes(gzip.compress(f["all_bad"].read_bytes() * 50)[:300])
    f["bad_json_list"] = root / "pairs.json"
    f["bad_json_list"].write_text('[{"chosen": "a", "rejected": "b"},')
    # output directories
    f["a_file"] = root / "a_file"
    f["a_file"].write_text("not a directory")
    half = root / "half_run"           # a run killed before its first checkpoint
    half.mkdir()
    (half / "train_config.json").write_text("{}")
    (half / "log.jsonl").write_text("")
    f["half_run"] = half
    f["done"] = root / "done"
    train.train(cli_config(*DONE, "--output_dir", f["done"]))
    f["done_copy"] = root / "done_copy"
    shutil.copytree(f["done"], f["done_copy"])
    shutil.rmtree(f["done_copy"] / "final_model")  # as if stopped after its checkpoint: resumable
    # stopped after its first checkpoint, whose weights were then edited to an integer dtype
    f["int_resume"] = as_if_stopped_at(f["done"], root / "int_resume", "checkpoint_step_1")
    edit_tensors(lambda s: s.update({"model.layers.0.mlp.up_proj.weight": s["model.layers.0.mlp.up_proj.weight"].to(
        torch.int32)}))(f["int_resume"] / "checkpoint_step_1" / "model")
    return f


# The troubleshooting table: (id, command, arguments, [what the message must say]). `o` is the case's own
# output directory (absent before), `fx` the inputs above. Each message names the problem and the remedy.
CASES = [
    # -- the model
    ("model path does not exist", "train", lambda fx, o: ["--model", str(fx["root"] / "nope"), *ON_MODEL],
     ["does not exist", "pass an existing directory or a Hub repo id"]),
    ("Hub id, offline, not cached", "train", lambda fx, o: ["--model", "Qwen/Qwen3-0.6B", *ON_MODEL],
     ["there is no local directory Qwen/Qwen3-0.6B; as a Hub model id, it is not in the local Hugging Face cache",
      "download it once with network access"]),
    ("directory without config.json", "train", lambda fx, o: ["--model", str(fx["empty_dir"]), *ON_MODEL],
     ["config.json is missing", "must hold the model's config.json"]),
    ("config.json not valid JSON", "train", lambda fx, o: ["--model", str(fx["bad_config_json"]), *ON_MODEL],
     ["is not valid JSON", "re-download or re-save"]),
    ("config of another architecture", "train", lambda fx, o: ["--model", str(fx["not_qwen3"]), *ON_MODEL],
     ["is not a Qwen3 config (model_type='llama')", "point --model at a Qwen3 checkpoint"]),
    ("no weights file", "train", lambda fx, o: ["--model", str(fx["no_weights"]), *ON_MODEL],
     ["holds no model.safetensors", "point at a directory with safetensors weights"]),
    ("corrupt safetensors", "train", lambda fx, o: ["--model", str(fx["corrupt_st"]), *ON_MODEL],
     ["model.safetensors is corrupt or truncated", "download the checkpoint again"]),
    ("truncated safetensors", "train", lambda fx, o: ["--model", str(fx["truncated_st"]), *ON_MODEL],
     ["model.safetensors is corrupt or truncated", "download the checkpoint again"]),
    ("config.json: num_key_value_heads 0", "train", lambda fx, o: ["--model", str(fx["kv_heads_0"]), *ON_MODEL],
     ["config.json: num_key_value_heads must be a whole number from 1 to 1,024 (got 0)",
      "correct the value or re-download the checkpoint"]),
    ("missing tensor", "train", lambda fx, o: ["--model", str(fx["missing_tensor"]), *ON_MODEL],
     ["1 missing tensor(s): model.norm.weight", "is it a Qwen3 checkpoint of the size its config.json says"]),
    ("mis-shaped tensor", "train", lambda fx, o: ["--model", str(fx["misshaped_tensor"]), *ON_MODEL],
     ["1 mis-shaped tensor(s): model.norm.weight (7,) (expected (64,))", "is it a Qwen3 checkpoint"]),
    ("tokenizer.json missing", "train", lambda fx, o: ["--model", str(fx["no_tokenizer"]), *ON_MODEL],
     ["has no tokenizer.json", "must hold its tokenizer files"]),
    ("tokenizer.json corrupt", "train", lambda fx, o: ["--model", str(fx["corrupt_tokenizer"]), *ON_MODEL],
     ["not a valid tokenizer.json", "re-download it"]),
    ("tokenizer of another model", "train", lambda fx, o: ["--model", str(fx["foreign_tokenizer"]), *ON_MODEL],
     ["the tokenizer belongs to another model", "copy the base model's tokenizer files"]),
    # -- the data
    ("data file does not exist", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["root"] / "nope.jsonl")],
     ["nope.jsonl: no such file or directory", "Hub dataset id like Anthropic/hh-rlhf"]),
    ("Hub dataset, offline, not cached", "train", lambda fx, o: [*DEMO, "--dataset", "Anthropic/hh-rlhf"],
     ["Anthropic/hh-rlhf: HF_HUB_OFFLINE is set and nothing of it is in the HF cache",
      "run once online to download it"]),
    ("unsupported extension", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["csv"])],
     ["unsupported file type", "use .parquet, .jsonl, .jsonl.gz or .json"]),
    ("corrupt parquet", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["corrupt_parquet"])],
     ["not a readable parquet file", "re-download or rewrite it"]),
    ("parquet without the columns", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["parquet_columns"])],
     ["has columns ['answer', 'question'], expected prompt, chosen, rejected", "rename the columns"]),
    ("jsonl without the columns", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["jsonl_columns"])],
     ["has columns ['label', 'text'], expected prompt, chosen, rejected", "rename the columns"]),
    ("empty dataset", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["empty"])],
     ["no usable pairs in", "it is empty (0 rows read)", "check the data and the path"]),
    ("every row bad", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["all_bad"])],
     ["no usable pairs in", "13 rows read, every one skipped", "'chosen == rejected': 12", "'empty field': 1",
      "check the data"]),
    ("rows of the wrong type", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["wrong_types"])],
     ["no usable pairs in", "'not a string': 4", "check the data"]),
    ("truncated .jsonl.gz", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["truncated_gz"])],
     ["can't read it to the end", "re-download it"]),
    ("invalid JSON list", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["bad_json_list"])],
     ["invalid JSON", "write one object per line (.jsonl)"]),
    ("glob matching nothing", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["root"] / "nothing-*.parquet")],
     ["the pattern matches no files", "check the path (and quote the pattern)"]),
    ("split that does not exist", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["splits"]),
                                                           "--eval_split", "validation"],
     ["no 'validation' split in the directory", "available splits: test, train"]),
    ("every training pair too long", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["huge"])],
     ["all 5 'train' pairs", "longer than --max_length 128 tokens", "raise --max_length"]),
    ("every eval pair too long", "train", lambda fx, o: [*DEMO, "--dataset", str(fx["long_eval"])],
     ["all 5 'test' pairs", "longer than --max_length 128 tokens", "raise --max_length"]),
    # -- the options
    ("batch size 0", "train", lambda fx, o: [*DEMO, "--batch_size", "0"],
     ["--batch_size must be a positive integer (got 0)"]),
    ("negative learning rate", "train", lambda fx, o: [*DEMO, "--learning_rate", "-0.001"],
     ["--learning_rate must be positive and finite (got -0.001)"]),
    ("epochs 0", "train", lambda fx, o: ["--config", "demo", "--num_epochs", "0"],
     ["--num_epochs must be positive and finite (got 0.0)", "or set --max_steps"]),
    ("max steps 0", "train", lambda fx, o: [*DEMO, "--max_steps", "0"],
     ["--max_steps must be a positive integer, or -1 to train --num_epochs (got 0)"]),
    ("max steps -2", "train", lambda fx, o: [*DEMO, "--max_steps", "-2"],
     ["--max_steps must be a positive integer, or -1 to train --num_epochs (got -2)"]),
    ("negative max length", "train", lambda fx, o: [*DEMO, "--max_length", "-5"],
     ["--max_length must be a positive integer (got -5)"]),
    ("a number that is not one", "train", lambda fx, o: [*DEMO, "--batch_size", "eight"],
     ["argument --batch_size: invalid int value: 'eight'", "see python train.py --help"]),
    ("unknown flag", "train", lambda fx, o: [*DEMO, "--batchsize", "8"],
     ["unrecognized arguments: --batchsize 8", "see python train.py --help"]),
    ("--resume with no checkpoint", "train", lambda fx, o: [*DEMO, "--resume"],
     ["--resume: no checkpoint in", "start without --resume"]),
    ("--resume, run stopped before its first checkpoint", "train",
     lambda fx, o: [*DEMO, "--resume", "--output_dir", str(fx["half_run"])],
     ["holds a run but no complete checkpoint", "start it again with --overwrite_output_dir"]),
    ("--resume with other settings", "train",
     lambda fx, o: [*DONE, "--output_dir", str(fx["done_copy"]), "--resume", "--batch_size", "2"],
     ["--resume: the checkpoint was trained with other settings", "(4 -> 2)", "resume with the same flags"]),
    ("output directory holds a finished run", "train", lambda fx, o: [*DEMO, "--output_dir", str(fx["done"])],
     ["holds a finished run (final_model/ is there)", "pass --overwrite_output_dir to train it again"]),
    ("output directory holds another run", "train", lambda fx, o: [*DEMO, "--output_dir", str(fx["half_run"])],
     ["already holds another run", "it stopped before its first checkpoint, so there is nothing to resume: pass "
      "--overwrite_output_dir to start it again"]),
    ("--overwrite_output_dir, then bad data", "train",
     lambda fx, o: [*DEMO, "--output_dir", str(fx["done"]), "--overwrite_output_dir", "--dataset",
                    str(fx["root"] / "nope.jsonl")],
     ["nope.jsonl: no such file or directory"]),           # the old run is replaced only once all is checked
    ("output directory under a regular file", "train",
     lambda fx, o: [*DEMO, "--output_dir", str(fx["a_file"] / "out")],
     ["cannot write to --output_dir", "(Not a directory); choose a writable directory"]),
    ("output directory in /proc", "train", lambda fx, o: [*DEMO, "--output_dir", "/proc/rm-hardening/out"],
     ["cannot write to --output_dir /proc/rm-hardening/out", "choose a writable directory"]),
    ("--8bit_optim without bitsandbytes", "train:bitsandbytes", lambda fx, o: [*DEMO, "--8bit_optim"],
     ["need bitsandbytes", "pip install bitsandbytes"]),
    ("--use_wandb without wandb", "train:wandb", lambda fx, o: [*DEMO, "--use_wandb"],
     ["--use_wandb needs the wandb package", "pip install wandb (or drop --use_wandb)"]),
    ("--report_to tensorboard without tensorboard", "train:tensorboard", lambda fx, o: [*DEMO, "--report_to", "tensorboard"],
     ["--report_to tensorboard needs the tensorboard package", "pip install tensorboard"]),
    ("--freeze_layers beyond the model", "train", lambda fx, o: [*DEMO, "--freeze_layers", "9"],
     ["--freeze_layers 9 is out of range: the model has 2 layers; use 0 to 2"]),
    # -- eval.py
    ("eval: not a reward model", "eval", lambda fx, o: [str(fx["causal_lm"]), "--dataset", "demo"],
     ["is not a reward model", "train one with train.py or pass a Qwen3ForSequenceClassification"]),
    ("eval: empty dataset", "eval", lambda fx, o: [str(fx["good_model"]), "--dataset", str(fx["empty"])],
     ["no usable pairs in", "it is empty (0 rows read)", "check the data and the path"]),
    ("eval: checkpoint does not exist", "eval", lambda fx, o: [str(fx["root"] / "nope"), "--dataset", "demo"],
     ["does not exist", "pass a directory written by train.py"]),
    ("eval: two-part relative path that does not exist", "eval", lambda fx, o: ["no-such-run/rm06", "--dataset", "demo"],
     ["there is no local directory no-such-run/rm06; as a Hub model id", "check the path"]),
    ("eval: directory without a model", "eval", lambda fx, o: [str(fx["empty_dir"]), "--dataset", "demo"],
     ["holds no model: expected config.json"]),
    ("eval: corrupt safetensors", "eval", lambda fx, o: [str(fx["corrupt_st"]), "--dataset", "demo"],
     ["is corrupt or truncated", "download the checkpoint again"]),
    ("eval: report that cannot be written", "eval", lambda fx, o: [str(fx["good_model"]), "--dataset", "demo",
                                                                   "--output", str(fx["a_file"] / "report.json")],
     ["cannot write the report", "a_file/report.json", "choose another --output"]),
    ("eval: reward_model.max_length not a number", "eval",
     lambda fx, o: [str(fx["rm_max_length"]), "--dataset", "demo"],
     ["its \"reward_model\" entry has max_length 'long', which must be a whole number >= 2",
      "correct it in config.json or re-save the model with train.py"]),
    ("eval: every pair too long", "eval", lambda fx, o: [str(fx["good_model"]), "--dataset", "demo",
                                                         "--max_samples", "4", "--max_length", "3"],
     ["all 4 pairs are longer than max_length 3 tokens", "raise --max_length"]),
]


# The same checks, in-process through errors.run_cli(main) (what `python train.py` runs): variants of
# cases above, kept out of the subprocess table to save the ~3 s that each interpreter start costs.
INPROCESS_CASES = [
    ("negative batch size", "train", lambda fx, o: [*DEMO, "--batch_size", "-4"],
     ["--batch_size must be a positive integer (got -4)"]),
    ("learning rate 0", "train", lambda fx, o: [*DEMO, "--learning_rate", "0"],
     ["--learning_rate must be positive and finite (got 0.0)", "e.g. 5e-6"]),
    ("learning rate nan", "train", lambda fx, o: [*DEMO, "--learning_rate", "nan"],
     ["--learning_rate must be positive and finite (got nan)"]),
    ("negative epochs", "train", lambda fx, o: ["--config", "demo", "--num_epochs", "-2"],
     ["--num_epochs must be positive and finite (got -2.0)", "or set --max_steps"]),
    ("max length 0", "train", lambda fx, o: [*DEMO, "--max_length", "0"],
     ["--max_length must be a positive integer (got 0)"]),
    ("save_total_limit 0", "train", lambda fx, o: [*DEMO, "--save_total_limit", "0"],
     ["--save_total_limit must be a positive integer (got 0)"]),
    ("output directory is a file", "train", lambda fx, o: [*DEMO, "--output_dir", str(fx["a_file"])],
     ["is a file; pass a directory"]),
    ("--8bit_model without bitsandbytes", "train:bitsandbytes", lambda fx, o: [*DEMO, "--8bit_model"],
     ["need bitsandbytes", "pip install bitsandbytes"]),
    ("eval: batch size 0", "eval", lambda fx, o: [str(fx["good_model"]), "--batch_size", "0"],
     ["argument --batch_size: 0 must be at least 1"]),
    # hand-edited or hostile config.json values: refused before any module is built
    ("config.json: a JSON list", "train", lambda fx, o: ["--model", str(fx["config_list"]), *ON_MODEL],
     ["config.json holds a JSON list, not an object", "re-download or re-save the checkpoint"]),
    ("config.json: hidden_size \"64\"", "train", lambda fx, o: ["--model", str(fx["hidden_str"]), *ON_MODEL],
     ["hidden_size must be a whole number from 1 to 65,536 (got '64')", "correct the value"]),
    ("config.json: vocab_size -5", "train", lambda fx, o: ["--model", str(fx["vocab_neg"]), *ON_MODEL],
     ["vocab_size must be a whole number from 1 to 4,194,304 (got -5)", "correct the value"]),
    ("config.json: num_hidden_layers 2.5", "train", lambda fx, o: ["--model", str(fx["layers_float"]), *ON_MODEL],
     ["num_hidden_layers must be a whole number from 1 to 1,024 (got 2.5)", "correct the value"]),
    ("config.json: 200,000 layers", "train", lambda fx, o: ["--model", str(fx["layers_200k"]), *ON_MODEL],
     ["num_hidden_layers must be a whole number from 1 to 1,024 (got 200000)", "correct the value"]),
    ("config.json disagrees with the weights", "train",
     lambda fx, o: ["--model", str(fx["config_vs_weights"]), *ON_MODEL],
     ["does not match its config.json: the weights hold 2 layers and embeddings of shape (", ", 64), config.json "
      "says 2 layers and (1000, 64)", "restore its config.json or re-download it"]),
    ("unexpected tensor", "train", lambda fx, o: ["--model", str(fx["unexpected_tensor"]), *ON_MODEL],
     ["1 unexpected tensor(s): model.extra.weight", "is it a Qwen3 checkpoint"]),
    ("config.json: reward_model not an object", "train", lambda fx, o: ["--model", str(fx["rm_not_object"]), *ON_MODEL],
     ["its \"reward_model\" entry 'mlp' needs a head in ('mlp', 'linear')", "re-save the model with train.py"]),
    ("eval: reward_model not an object", "eval", lambda fx, o: [str(fx["rm_not_object"]), "--dataset", "demo"],
     ["its \"reward_model\" entry 'mlp' needs a head in ('mlp', 'linear')", "re-save the model with train.py"]),
    ("eval: reward_model.head not a string", "eval", lambda fx, o: [str(fx["rm_head_list"]), "--dataset", "demo"],
     ["'head': ['mlp']", "needs a head in ('mlp', 'linear')", "re-save the model with train.py"]),
    ("eval: reward_model.pooling not a string", "eval", lambda fx, o: [str(fx["rm_pooling_int"]), "--dataset", "demo"],
     ["'pooling': 3", "and a pooling in ('mean', 'last')", "re-save the model with train.py"]),
    ("reward_model.max_length not a number", "train", lambda fx, o: ["--model", str(fx["rm_max_length"]), *ON_MODEL],
     ["has max_length 'long', which must be a whole number >= 2"]),
    ("weights of an integer dtype", "train", lambda fx, o: ["--model", str(fx["int_tensor"]), *ON_MODEL],
     ["tensor model.norm.weight holds I64 values, not weights (F32, F16 or BF16)", "re-download or re-save it"]),
    ("eval: weights of a bool dtype", "eval", lambda fx, o: [str(fx["bool_tensor"]), "--dataset", "demo"],
     ["tensor reward_head.fc2.weight holds BOOL values, not weights", "re-download or re-save it"]),
    ("--resume: weights of an integer dtype", "train",
     lambda fx, o: [*DONE, "--output_dir", str(fx["int_resume"]), "--resume"],
     ["checkpoint_step_1/model/model.safetensors: tensor model.layers.0.mlp.up_proj.weight holds I32 values",
      "re-download or re-save it"]),
    ("eval: config.json num_key_value_heads 0", "eval", lambda fx, o: [str(fx["kv_heads_0"]), "--dataset", "demo"],
     ["num_key_value_heads must be a whole number from 1 to 1,024 (got 0)"]),
    # issue 30 §6: each was a traceback
    ("eval: reward_stats mean 10**400", "eval", lambda fx, o: [str(fx["stats_overflow"]), "--dataset", "demo"],
     ["its \"reward_model\" entry has reward_stats", "which must be {\"mean\", \"std\" > 0, \"n\"}",
      "correct it in config.json"]),
    ("eval: a model directory whose name is not UTF-8", "eval", lambda fx, o: [str(fx["not_utf8"]), "--dataset", "demo"],
     ["model-\\udcff/model.safetensors': its path is not valid UTF-8", "rename the directory to a UTF-8 name"]),
    ("--output_dir not UTF-8", "train", lambda fx, o: [*DEMO, "--output_dir", os.fsdecode(bytes(o) + b"-\xff")],
     ["--output_dir", "the path is not valid UTF-8", "choose a UTF-8 name"]),
    *[(f"a name over 255 bytes: {flag}", script, lambda fx, o, flag=flag, before=before: [*before(fx), flag,
                                                                                         str(fx["root"] / LONG)],
       [flag, "a name in it is 300 bytes, over the 255 a file system allows", "choose a shorter path"])
      for flag, script, before in [("--output_dir", "train", lambda fx: DEMO), ("--dataset", "train", lambda fx: DEMO),
                                   ("--model", "train", lambda fx: ON_MODEL), ("--resume", "train", lambda fx: DEMO),
                                   ("--output", "eval", lambda fx: [str(fx["good_model"]), "--dataset", "demo"]),
                                   ("--plots", "eval", lambda fx: [str(fx["good_model"]), "--dataset", "demo"])]],
    ("a name over 255 bytes: eval.py CHECKPOINT", "eval", lambda fx, o: [str(fx["root"] / LONG), "--dataset", "demo"],
     ["CHECKPOINT", "a name in it is 300 bytes, over the 255 a file system allows", "choose a shorter path"]),
]
# Further variants that run in-process too: every interpreter start costs ~3 s of CPU, and what these add is
# the message, not the process (the Hub *model* case stays a subprocess: huggingface_hub reads
# HF_HUB_OFFLINE at import).
_ALSO_IN_PROCESS = {"config.json not valid JSON", "no weights file", "truncated safetensors",
                    "tokenizer of another model", "Hub dataset, offline, not cached", "jsonl without the columns",
                    "truncated .jsonl.gz", "invalid JSON list", "unknown flag", "output directory in /proc",
                    "--resume, run stopped before its first checkpoint", "--freeze_layers beyond the model",
                    "eval: directory without a model", "eval: corrupt safetensors", "eval: every pair too long",
                    "eval: report that cannot be written", "--overwrite_output_dir, then bad data",
                    "mis-shaped tensor", "tokenizer.json corrupt", "every eval pair too long",
                    "output directory holds another run", "max steps 0", "max steps -2",
                    "eval: checkpoint does not exist"}
INPROCESS_CASES += [c for c in CASES if c[0] in _ALSO_IN_PROCESS]
CASES = [c for c in CASES if c[0] not in _ALSO_IN_PROCESS]
IDS = [c[0] for c in CASES]
assert len(set(IDS)) == len(IDS) >= 25
assert not set(IDS) & {c[0] for c in INPROCESS_CASES}


def watched(fx):
    return [fx["done"], fx["done_copy"], fx["half_run"], fx["good_model"], fx["a_file"], fx["int_resume"]]


@pytest.fixture(scope="module")
def results(fx):
    """Run every case (two subprocesses at a time); record what each left behind."""

    def run(case):
        name, cli, args, _ = case
        out = fx["root"] / "out" / name.replace(" ", "_").replace("/", "_")
        report = fx["root"] / "reports" / (out.name + ".json")
        script, _, blocked = cli.partition(":")
        argv = args(fx, out)
        if script == "train":
            argv = argv + ["--output_dir", str(out)] if "--output_dir" not in argv else argv
        elif "--output" not in argv:
            argv = argv + ["--output", str(report)]
        prefix = [sys.executable, "-c", RUNNER, f"{script}.py", blocked] if blocked else \
            [sys.executable, f"{script}.py"]
        env = {**ENV, "HF_HUB_CACHE": str(fx["root"] / "hf_cache"), "HF_HOME": str(fx["root"] / "hf_home")}
        proc = subprocess.run(prefix + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return name, (proc, out, report)

    before = {p: snapshot(p) for p in watched(fx)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(pool.map(run, CASES))
    done["__unchanged__"] = {str(p): snapshot(p) == before[p] for p in watched(fx)}
    return done


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input(results, case):
    name, cli, _, expected = case
    proc, out, report = results[name]
    stderr = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and stderr.count("\n") == 0, proc.stderr
    assert stderr.startswith("error: "), stderr
    for text in expected:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert not out.exists() and not report.exists(), sorted(os.listdir(out)) if out.exists() else report


def test_bad_input_leaves_existing_directories_untouched(results):
    assert all(results["__unchanged__"].values()), results["__unchanged__"]


@pytest.mark.parametrize("case", INPROCESS_CASES, ids=[c[0] for c in INPROCESS_CASES])
def test_bad_input_in_process(fx, case, tmp_path, capsys, monkeypatch):
    import eval as eval_cli
    from support.errors import run_cli
    name, cli, args, expected = case
    script, _, blocked = cli.partition(":")
    for module in filter(None, blocked.split(",")):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delenv("RM_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(fx["root"] / "hf_cache"))
    out, report = tmp_path / "out", tmp_path / "report.json"
    argv = args(fx, out)
    if script == "train" and "--output_dir" not in argv:
        argv += ["--output_dir", str(out)]
    elif script == "eval" and "--output" not in argv:
        argv += ["--output", str(report)]
    before = [snapshot(p) for p in watched(fx)]
    with pytest.raises(SystemExit) as exit_:
        run_cli((train if script == "train" else eval_cli).main, argv)
    stderr = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and stderr.count("\n") == 0 and stderr.startswith("error: "), stderr
    for text in expected:
        assert text in stderr, f"{text!r} not in {stderr!r}"
    assert not out.exists() and not report.exists() and [snapshot(p) for p in watched(fx)] == before


def test_model_may_be_a_finished_run_as_in_eval(fx, tmp_path):
    """train.py --model OUTPUT_DIR (a finished run) starts from its final_model/, as eval.py OUTPUT_DIR
    evaluates it; a checkpoint_step_N/ gives its model/. Both load exactly those weights."""
    from support import hub
    assert hub.resolve_model_dir(str(fx["done"])) == fx["done"] / "final_model"
    assert hub.resolve_model_dir(str(fx["done"] / "checkpoint_step_1")) == fx["done"] / "checkpoint_step_1" / "model"
    before = snapshot(fx["done"])
    run, final = RewardModel.from_pretrained(str(fx["done"])), RewardModel.from_pretrained(str(fx["done"] / "final_model"))
    assert all(torch.equal(a, b) for a, b in zip(run.state_dict().values(), final.state_dict().values()))
    train.train(cli_config("--model", fx["done"], *ON_MODEL, "--output_dir", tmp_path / "again"))
    assert (tmp_path / "again" / "final_model" / "config.json").is_file() and snapshot(fx["done"]) == before


@pytest.mark.parametrize("flag,value", [("--learning_rate", "-1e-5"), ("--learning_rate", "-inf"),
                                        ("--max_grad_norm", "-1E-3")])
def test_negative_number_after_a_flag_is_its_value(tmp_path, capsys, monkeypatch, flag, value):
    """`--learning_rate -1e-5` gets validate()'s message, as `--learning_rate=-1e-5` does, not argparse's
    "expected one argument" (its negative-number pattern misses exponents and inf before Python 3.14)."""
    from support.errors import run_cli
    monkeypatch.delenv("RM_DEBUG", raising=False)
    argv = [*DEMO, "--output_dir", str(tmp_path / "o")]
    messages = []
    for words in ([flag, value], [f"{flag}={value}"]):
        monkeypatch.setattr(sys, "argv", ["train.py", *argv, *words])  # as `python train.py ...` (argv=None)
        with pytest.raises(SystemExit) as exit_:
            run_cli(train.main)
        assert exit_.value.code == 2
        messages.append(capsys.readouterr().err.strip())
    assert messages[0] == messages[1] and messages[0].count("\n") == 0, messages
    assert messages[0].startswith(f"error: {flag} must be "), messages[0]
    assert not (tmp_path / "o").exists()


def test_negative_number_after_an_eval_flag_is_its_value(capsys):
    """The same for eval.py (one errors.ArgumentParser serves every CLI): the value's own message."""
    import eval as eval_cli
    with pytest.raises(UserError, match=r"--unsure_threshold -0.001 must be a number >= 0"):
        eval_cli.parse_args(["ckpt", "--unsure_threshold", "-1e-3"])


def test_bf16_without_gpu_support(tmp_path, capsys, monkeypatch):
    """--bf16 on a CUDA GPU without bfloat16 (e.g. a T4): refused before anything is written."""
    from support.errors import run_cli
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    monkeypatch.delenv("RM_DEBUG", raising=False)
    with pytest.raises(UserError, match=r"^--bf16 needs a GPU with bfloat16 support \(Tesla T4 has none\); drop --bf16$"):
        validate.validate(cli_config(*DEMO, "--bf16", "--device", "cuda"))
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, [*DEMO, "--bf16", "--device", "cuda", "--output_dir", str(tmp_path / "o")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# Faults

# 12 steps, a checkpoint after every one (so kills land in checkpoint writes), evaluations at 4 and 8.
KILL = ["--config", "demo", "--max_train_samples", "48", "--max_eval_samples", "8", "--batch_size", "4",
        "--max_steps", "12", "--save_steps", "1", "--save_total_limit", "2", "--eval_steps", "4",
        "--logging_steps", "1", "--warmup_ratio", "0", "--no_progress"]
SMALL = ["--config", "demo", "--max_train_samples", "24", "--max_eval_samples", "8", "--batch_size", "4",
         "--eval_steps", "1000", "--logging_steps", "1", "--warmup_ratio", "0", "--no_progress"]


def wait_for(condition, proc, timeout=120):
    """Poll (tightly) until condition() is true or the process has exited."""
    deadline = time.monotonic() + timeout

    def check():
        try:
            return condition()
        except FileNotFoundError:  # the directory is created, probed and removed before the run starts
            return False
    while not check():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out"
    return True


def hidden(out):
    """Hidden entries other than the run lock (which stays, unlocked, once its run has ended)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock")


def check_loadable(ckpt: Path) -> int:
    """A complete checkpoint: the model loads, the optimizer state loads, trainer_state.json parses."""
    model = RewardModel.from_pretrained(str(ckpt / "model"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    load_file(ckpt / "optimizer.safetensors")
    json.loads((ckpt / "optimizer.json").read_text())
    return json.loads((ckpt / "trainer_state.json").read_text())["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train.train(cli_config(*KILL, "--output_dir", out))
    return load_file(out / "final_model" / "model.safetensors")


def listing_has(*parts):
    return lambda out: any(all(part in name for part in parts) for name in os.listdir(out))


# Where the SIGKILL lands: named moments (polled for tightly, so the kill comes within microseconds of the
# moment showing), and random ones (a seeded delay after the first checkpoint).
KILL_AT = {"in a checkpoint write": listing_has(".checkpoint_step_", ".tmp-"),
           "while an old checkpoint is deleted": listing_has(".checkpoint_step_", ".old-"),
           "in the final model write": listing_has(".final_model.tmp-"),
           "at random 1": 1, "at random 2": 2}


@pytest.mark.parametrize("moment", list(KILL_AT))
def test_sigkill_anywhere_then_resume_is_bitwise_exact(reference, tmp_path, moment):
    out = tmp_path / "run"
    env = {**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as the reference
    with open(tmp_path / "stderr", "w") as err:  # a file, not a pipe: nothing can block the child
        proc = subprocess.Popen([sys.executable, "train.py", *KILL, "--output_dir", str(out)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: checkpoint_dirs(out), proc)
        if callable(KILL_AT[moment]):
            seen = wait_for(lambda: KILL_AT[moment](out), proc)
        else:
            time.sleep(random.Random(KILL_AT[moment]).uniform(0, 0.4))
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode in (-signal.SIGKILL, 0), (tmp_path / "stderr").read_text()
    if moment == "in a checkpoint write":
        assert seen and proc.returncode == -signal.SIGKILL
    # Whatever the moment: the newest complete checkpoint loads.
    last = checkpoint_dirs(out)[-1]
    print(f"killed {moment}: exit {proc.returncode}, newest {last.name}, left behind {hidden(out)}")
    assert check_loadable(last) == int(last.name.rsplit("_", 1)[1])
    if (out / "final_model").is_dir():  # the kill came after the final model: as if after its last checkpoint
        shutil.rmtree(out / "final_model")  # (a finished run is not resumed)
    # Leftovers of killed writes must not be taken for a checkpoint: plant one that looks newer, and a
    # log line cut in the middle.
    fake = out / ".checkpoint_step_999.tmp-12345"
    fake.mkdir()
    (fake / "trainer_state.json").write_text('{"step": 999}')
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 9')
    result = train.train(cli_config(*KILL, "--output_dir", out, "--resume"))
    final = load_file(out / "final_model" / "model.safetensors")
    assert all(torch.equal(reference[k], final[k]) for k in reference)
    assert hidden(out) == []                                        # leftovers cleaned at the start
    assert len(checkpoint_dirs(out)) <= 2                           # --save_total_limit
    assert [r["step"] for r in result["history"] if "loss" in r] == list(range(1, 13))  # each step logged once


SIGNAL_RUN = [*SMALL, "--max_steps", "5000", "--save_steps", "100000"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_prints_a_working_resume_line(tmp_path, sig):
    out = tmp_path / "run dir"  # a space: the printed command must quote it
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "train.py", *SIGNAL_RUN, "--output_dir", str(out)], cwd=ROOT,
                                env=ENV, stdout=so, stderr=se)
    try:
        assert wait_for(lambda: (out / "log.jsonl").read_text().count("\n") >= 2, proc), \
            (tmp_path / "stderr").read_text()
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed before the run could end: do not leave it running
            proc.kill()
            proc.wait()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + sig, stderr        # not 0: `train.py && eval.py` must not go on
    assert "Traceback" not in stderr, stderr
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if f"{sig.name} received: saved" in line)
    assert lines[i].endswith("Resume with:")
    command = shlex.split(lines[i + 1])
    assert command[:2] == ["python", "train.py"] and command[-2] == "--resume"
    ckpt = Path(command[-1])
    assert ckpt.parent == out and check_loadable(ckpt) == int(ckpt.name.rsplit("_", 1)[1])
    # The printed command continues the run (here: for two more steps).
    stopped = int(ckpt.name.rsplit("_", 1)[1])
    result = train.train(cli_config(*command[2:], "--max_steps", stopped + 2))
    assert result["step"] == stopped + 2 and (out / "final_model" / "model.safetensors").is_file()


# `python train.py ARGS` whose checkpoint writes, after the first, stall for a minute once the model files are
# in the temporary directory (a very slow disk): the signals of a test land in the middle of a checkpoint write.
SLOW_CHECKPOINTS = (
    "import runpy, sys, time, rm\n"
    "sys.argv.pop(0); real, writes = rm.RewardModel.save_pretrained, []\n"
    "def slow(self, path, *args, **kwargs):\n"
    "    real(self, path, *args, **kwargs)\n"
    "    if '.checkpoint_step_' in str(path):\n"
    "        writes.append(path)\n"
    "        if len(writes) > 1:\n"
    "            print('stalling in', path, flush=True)\n"
    "            time.sleep(60)\n"
    "rm.RewardModel.save_pretrained = slow\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_second_sigint_stops_at_once_and_leaves_no_half_written_checkpoint(tmp_path):
    """Ctrl-C twice: the first asks for a checkpoint, the second abandons it (here: in the middle of writing
    it) and exits at once with 130, naming the last complete checkpoint, from which --resume continues."""
    out = tmp_path / "run"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CHECKPOINTS, "train.py", *SMALL, "--max_steps", "5000",
                                 "--save_steps", "2", "--output_dir", str(out)], cwd=ROOT, env=ENV, stdout=so, stderr=se)
    try:
        # The step-2 checkpoint is complete; the step-4 one is half-written (model/ only) and stalls.
        assert wait_for(lambda: "stalling in" in (tmp_path / "stdout").read_text(), proc), \
            (tmp_path / "stderr").read_text()
        proc.send_signal(signal.SIGINT)  # the first: "checkpoint, then stop" (the write goes on)
        time.sleep(0.5)                  # two signals at once could merge into one
        proc.send_signal(signal.SIGINT)  # the second: "now"
        proc.wait(timeout=30)            # not the minute the stalled write would take
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "stderr").read_text().strip()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 0, stderr
    last = out / "checkpoint_step_2"
    assert stderr.startswith("second SIGINT (Ctrl-C): stopped at once after step 4/5000, without the checkpoint "
                             f"the first one asked for; the last saved checkpoint {last} is intact. Resume with: "
                             "python train.py "), stderr
    # Nothing of the abandoned write is left, nor anything resume could take for a checkpoint.
    assert checkpoint_dirs(out) == [last] and hidden(out) == [] and not (out / "checkpoint_step_4").exists()
    assert check_loadable(last) == 2
    command = shlex.split(stderr.split("Resume with: ")[1])
    assert command[:2] == ["python", "train.py"] and command[-2:] == ["--resume", str(last)]
    result = train.train(cli_config(*command[2:], "--max_steps", 4))
    assert result["step"] == 4 and (out / "final_model" / "model.safetensors").is_file()


def test_second_sigint_before_the_first_checkpoint(tmp_path, capsys, monkeypatch):
    """Ctrl-C twice before any checkpoint exists: exit 130 at once, saying there is nothing to resume."""
    from support.errors import run_cli
    real, handler = checkpoint.append_log, signal.getsignal(signal.SIGINT)

    def ctrl_c_twice(out, record):
        real(out, record)
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)  # the handler runs before raise_signal returns
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(checkpoint, "append_log", ctrl_c_twice)
    out = tmp_path / "run"
    try:  # anything but SystemExit (a KeyboardInterrupt above all) must fail this test, not stop pytest
        run_cli(train.main, [*SMALL, "--max_steps", "50", "--save_steps", "10", "--output_dir", str(out)])
        outcome = "returned"
    except BaseException as e:
        outcome = e
    assert isinstance(outcome, SystemExit) and outcome.code == 128 + signal.SIGINT, repr(outcome)
    stderr = capsys.readouterr().err.strip()
    assert stderr == ("second SIGINT (Ctrl-C): stopped at once after step 2/50, without the checkpoint the first "
                      "one asked for; no checkpoint had been saved yet, so there is nothing to resume: run again "
                      "with --overwrite_output_dir"), stderr
    assert checkpoint_dirs(out) == [] and hidden(out) == []
    assert signal.getsignal(signal.SIGINT) is handler  # train() put its handlers back


def test_ctrl_c_outside_the_training_loop_is_one_line(capsys, monkeypatch):
    """Ctrl-C while a CLI loads data or scores pairs (no handler of its own): one line and status 130."""
    from support.errors import run_cli

    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.delenv("RM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(interrupted, [])
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def closed_pipe():
    """The writing end of a pipe whose reader has gone (tee killed by the same Ctrl-C, `| head` done)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def test_signal_under_a_closed_pipe_still_saves_and_exits_130(tmp_path):
    """`python train.py ... 2>&1 | tee log` (and `2>err | tee log`), Ctrl-C: tee dies too. The stop path does
    not depend on stdout: every print into the dead pipe is dropped, the checkpoint is saved, the status is
    130, and --resume continues. The two runs go side by side."""
    runs = {}
    for name in ("2>&1", "2>file"):
        out, pipe = tmp_path / name, closed_pipe()
        # 2>&1: with the progress bar (tqdm writes to stderr, the dead pipe here, at every step)
        args = [a for a in SIGNAL_RUN if a != "--no_progress"] if name == "2>&1" else SIGNAL_RUN
        with open(tmp_path / f"{name}.stderr", "w") as se:
            runs[name] = out, subprocess.Popen([sys.executable, "train.py", *args, "--output_dir", str(out)],
                                               cwd=ROOT, env=ENV, stdout=pipe, stderr=pipe if name == "2>&1" else se)
        os.close(pipe)
    try:
        for out, proc in runs.values():
            assert wait_for(lambda: (out / "log.jsonl").read_text().count("\n") >= 2, proc), \
                (tmp_path / "2>file.stderr").read_text()
            proc.send_signal(signal.SIGINT)
        for out, proc in runs.values():
            proc.wait(timeout=120)
    finally:
        for _, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "2>file.stderr").read_text()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    for out, proc in runs.values():
        assert proc.returncode == 130, stderr
        [ckpt] = checkpoint_dirs(out)
        stopped = check_loadable(ckpt)
    result = train.train(cli_config(*SIGNAL_RUN, "--output_dir", out, "--resume", "--max_steps", stopped + 2))
    assert result["step"] == stopped + 2 and (out / "final_model" / "model.safetensors").is_file()


def test_eval_under_a_closed_pipe_writes_its_report_and_exits_0(tmp_path):
    """`python eval.py ... | head -1`, on pairs and with --benchmark: the report is written first, and what
    is printed into the pipe whose reader has gone is dropped, not a BrokenPipeError (before: exit 1 and a
    traceback). The two run side by side."""
    model = save_reward_model(tmp_path / "model")
    rows = [{"prompt": f"question {k}", "chosen": "yes", "chosen_model": "a", "rejected": "no",
             "rejected_model": "b", "subset": "alpacaeval-easy", "id": k} for k in range(2)]
    modes = {"pairs": ["--dataset", str(write_jsonl(tmp_path / "pairs.jsonl", demo_rows(4)))],
             # --show prints an example before scoring: into the dead pipe too
             "benchmark": ["--benchmark", "rewardbench", "--dataset", str(write_jsonl(tmp_path / "rb.jsonl", rows)),
                           "--show", "1"]}
    procs = {}
    for mode, args in modes.items():
        pipe = closed_pipe()
        procs[mode] = subprocess.Popen([sys.executable, "eval.py", str(model), *args, "--output",
                                        str(tmp_path / mode / "evaluation_report.json"), "--device", "cpu",
                                        "--no_progress"], cwd=ROOT, env=ENV, stdout=pipe, stderr=subprocess.PIPE,
                                       text=True)
        os.close(pipe)
    for mode, proc in procs.items():
        stderr = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0 and "Traceback" not in stderr, (mode, stderr)
    assert json.loads((tmp_path / "pairs" / "evaluation_report.json").read_text())["num_pairs"] == 4
    assert json.loads((tmp_path / "benchmark" / "evaluation_report.json").read_text())["benchmark"]["examples"] == 2


def test_run_cli_drops_output_into_a_gone_reader_and_keeps_the_exit_status():
    """The one mechanism behind the two tests above, for every command (train.py, eval.py, tools): output
    into a pipe without a reader is dropped, the command's own exit status stays, Python's last flush at exit
    adds nothing (no 'Exception ignored', no status 120), with or without buffering."""
    program = ("import sys; from support.errors import run_cli\n"
               "def main(argv):\n"
               "    for i in range(1000):\n"
               "        print('line', i)\n"
               "    print('to stderr', file=sys.stderr)\n"
               "    sys.exit(3)\n"
               "run_cli(main)\n")
    for unbuffered in ("1", ""):
        pipe = closed_pipe()
        proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env={**ENV, "PYTHONUNBUFFERED": unbuffered},
                              stdout=pipe, stderr=subprocess.PIPE, text=True, timeout=60)
        os.close(pipe)
        assert (proc.returncode, proc.stderr) == (3, "to stderr\n"), proc.stderr
    # started with stdout closed (`>&-`: sys.stdout is None): print() drops it, as it always did
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1))
    assert (proc.returncode, proc.stderr) == (3, "to stderr\n"), proc.stderr


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("fault", ["nan loss", "inf gradient"])
def test_non_finite_step_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fault):
    real, calls = train.pairwise_loss, {"n": 0}

    def poisoned(*args, **kwargs):  # the 5th training step goes wrong
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan") if fault == "nan loss" else InfGrad.apply(out["loss"])
        return out
    monkeypatch.setattr(train, "pairwise_loss", poisoned)  # the loss the training loop calls
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.train(cli_config(*SMALL, "--max_steps", "8", "--save_steps", "2", "--output_dir", out))
    what = "the loss became nan" if fault == "nan loss" else "the gradient norm became"  # inf, or nan (inf x 0)
    assert str(e.value).startswith(what) and " at step 5; training stopped" in str(e.value)
    assert f"Last good checkpoint: {out / 'checkpoint_step_4'}" in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint_step_2", "checkpoint_step_4"]
    assert check_loadable(out / "checkpoint_step_4") == 4
    assert not (out / "final_model").exists() and hidden(out) == []


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if ".checkpoint_step_4." in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.train(cli_config(*SMALL, "--max_steps", "6", "--save_steps", "2", "--output_dir", out))
    assert str(e.value) == (f"no space left on device while writing {out / 'checkpoint_step_4'}; "
                            "free space or choose another --output_dir")
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint_step_2"]
    assert check_loadable(out / "checkpoint_step_2") == 2 and hidden(out) == []


def test_really_full_disk(tmp_path):
    """The same on a real full filesystem (a small tmpfs: opt-in, see conftest.small_tmpfs): torch.save
    and safetensors report a full disk in their own ways, and both end in the same one line."""
    with small_tmpfs(tmp_path / "small", "5m") as mnt:
        out = mnt / "run"
        with pytest.raises(UserError, match=r"^no space left on device while writing .*; free space or choose "
                                            r"another --output_dir$"):
            train.train(cli_config(*SMALL, "--max_steps", "40", "--save_steps", "1", "--save_total_limit", "100",
                                   "--output_dir", out))
        ckpts = checkpoint_dirs(out)
        assert len(ckpts) >= 1 and check_loadable(ckpts[-1]) == len(ckpts) and hidden(out) == []


def test_reward_stats_too_large_for_a_float_is_one_line_in_the_api_and_the_server(fx):
    """reward_stats {"mean": 10**400} (a JSON integer no float holds) was an OverflowError traceback in
    from_pretrained and tools.serve, as in eval.py (the table above): the entry's check now compares, never
    converts."""
    from tools import serve
    message = r"its \"reward_model\" entry has reward_stats .*correct it in config.json"
    with pytest.raises(UserError, match=message):
        RewardModel.from_pretrained(str(fx["stats_overflow"]))
    with pytest.raises(UserError, match=message):
        serve.main([str(fx["stats_overflow"]), "--port", "0", "--device", "cpu"])
    with pytest.raises(UserError, match=r"^CHECKPOINT .*: a name in it is 300 bytes, over the 255"):
        serve.main([str(fx["root"] / LONG), "--port", "0"])


def test_a_failed_atomic_write_tells_its_own_error_not_the_cleanups(tmp_path, monkeypatch):
    """On a read-only disk the temporary file's cleanup fails too (EROFS, even for a file that was never
    made); it raised a second OSError that hid the first."""
    from pathlib import Path as P
    from support import fileio

    def refused(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(P, "unlink", refused)
    monkeypatch.setattr(fileio, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")),
                        raising=False)
    with pytest.raises(OSError) as error:
        fileio.write_text_atomic(tmp_path / "x.json", "{}")
    assert error.value.errno == errno.ENOSPC


def test_save_reward_stats_on_a_read_only_model_directory_is_refused_before_scoring(fx, tmp_path, capsys):
    """eval.py --save_reward_stats on a read-only model directory: checked first (it was a traceback after
    scoring); one line, nothing written. A real read-only mount (opt-in, conftest.small_tmpfs)."""
    import eval as eval_cli
    from support.errors import run_cli
    with small_tmpfs(tmp_path / "ro", "4m") as mnt:
        shutil.copytree(fx["good_model"], mnt / "model")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        report = tmp_path / "report.json"
        with pytest.raises(SystemExit) as exit_:
            run_cli(eval_cli.main, [str(mnt / "model"), "--dataset", "demo", "--max_samples", "4", "--save_reward_stats",
                                    "--output", str(report), "--device", "cpu", "--no_progress"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.count("\n") == 0 and not report.exists(), err
        assert err.startswith(f"error: cannot write the reward statistics into {mnt}/model/config.json (Read-only "
                              "file system); evaluate a copy of the model in a writable directory"), err


def test_corrupt_and_too_long_rows_are_skipped_counted_and_training_goes_on(tmp_path, capsys):
    rows = [json.dumps(r) for r in demo_rows(30)]
    huge = " ".join(["the key ideas are stars and planets."] * 300)
    too_long = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: " + huge,
                           "rejected": "\n\nHuman: hi\n\nAssistant: no. " + huge})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows[:15] + ['{"chosen": "cut off by a full disk', "[1, 2]"] + rows[15:]
                              + [too_long] * 3) + "\n")
    out = tmp_path / "run"
    result = train.train(cli_config("--config", "demo", "--dataset", data, "--max_steps", "2",
                                    "--max_eval_samples", "8", "--no_progress", "--output_dir", out))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data:"))
    # one file, no --eval_dataset: its held-out share (one pair here) is evaluated, never a training pair
    assert line.startswith("data: 29 training pairs, 1 eval pair (held out of the training pairs by content hash: "
                           "--eval_fraction 0.05) | train: 35 rows read, 33 kept, "
                           "2 skipped (1 not an object, 1 unparsable line), 3 dropped as too long | eval: "), line
    assert result["step"] == 2 and (out / "final_model" / "model.safetensors").is_file()


# A process holding the output directory's lock, as a running train.py does (checkpoint.take_output_dir).
HOLDER = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
          "time.sleep(300)")


@pytest.mark.parametrize("refusal", ["another run's files", "another run holds the lock"])
def test_rank_0_only_error_ends_every_process_at_once(tmp_path, refusal):
    """Under torchrun only rank 0 checks (and locks) the output directory. Its refusal must reach the other
    process at once: both exit with status 2, the message is printed once (by rank 0), no traceback
    anywhere. The two processes get the environment torchrun gives its workers (gloo on CPU), so each one's
    exit status shows."""
    import socket
    out = tmp_path / "out"
    out.mkdir()
    if refusal == "another run's files":
        (out / "train_config.json").write_text("{}")  # refused unless --resume/--overwrite
        expected = f"error: --output_dir {out} already holds another run (train_config.json)"
        left = ["train_config.json"]
    else:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".lock")], stdout=subprocess.PIPE,
                                  text=True)
        assert holder.stdout.readline().strip() == "held"
        expected = f"error: --output_dir {out} is in use by another train.py run (process {holder.pid})"
        left = [".lock"]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, t0 = [], time.monotonic()
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "train.py", *DEMO, "--output_dir", str(out)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs + ([holder] if refusal != "another run's files" else []):
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - t0
    stderrs = [err.strip() for _, err in results]
    assert [p.returncode for p in procs] == [2, 2], stderrs
    assert stderrs[0].startswith(expected), stderrs
    assert stderrs[0].count("\n") == 0 and stderrs[1] == "", stderrs
    assert sorted(p.name for p in out.iterdir()) == left  # nothing written
    assert elapsed < 60, elapsed


# ----------------------------------------------------------------------------------------------
# Long runs


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_long_run_memory_and_disk_stay_flat(tmp_path, monkeypatch):
    """300 steps: host RSS does not grow step over step, checkpoints do not grow with the step, and
    --save_total_limit bounds how many there are."""
    samples, real = [], checkpoint.append_log

    def sampling_log(out, record):
        real(out, record)
        if "loss" in record:
            ckpts = checkpoint_dirs(out)
            samples.append({"step": record["step"], "rss": rss_mib(), "checkpoints": len(ckpts),
                            "state_bytes": [(c / "trainer_state.json").stat().st_size for c in ckpts]})
    monkeypatch.setattr(checkpoint, "append_log", sampling_log)
    out = tmp_path / "run"
    train.train(cli_config("--config", "demo", "--max_train_samples", "48", "--max_eval_samples", "8",
                           "--batch_size", "4", "--max_steps", "300", "--logging_steps", "5", "--save_steps", "20",
                           "--save_total_limit", "2", "--eval_steps", "100", "--no_progress", "--output_dir", out))
    assert len(samples) == 60
    # Host RSS swings by up to ~8 MiB from sample to sample (allocator, checkpoint writes, evaluations) with
    # no trend (1,500 steps measured): compare the median after the warm-up (steps 35-130) with the median
    # of the last 20 samples (steps 205-300). A leak of 30 KiB per step would add 5 MiB between them.
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    growth = median([s["rss"] for s in samples[40:]]) - median([s["rss"] for s in samples[6:26]])
    assert growth < 5.0, (growth, [round(s["rss"], 1) for s in samples])
    assert max(s["checkpoints"] for s in samples) <= 2
    sizes = [b for s in samples for b in s["state_bytes"]]
    assert max(sizes) - min(sizes) < 64, sizes  # no history inside: a few digits of difference at most
