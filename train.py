"""Train a Qwen3 reward model: one hand-written loop, readable top to bottom.

    python train.py --config demo                        # tiny model, synthetic task, CPU, ~1 minute
    python train.py --model Qwen/Qwen3-0.6B --bf16       # the real thing, on Anthropic/hh-rlhf
    torchrun --nproc_per_node=8 train.py --config qwen3_1.7b --bf16 --fsdp

What one optimizer step does:
  1. take the next global batch of preference pairs (length-grouped, deterministic for the seed);
     under torchrun each process takes its own slice of it;
  2. for each micro-batch: chosen + rejected in ONE forward pass -> rewards -> pairwise loss -> backward
     (bf16 autocast over fp32 master weights with --bf16; activations recomputed with
     --gradient_checkpointing);
  3. clip the gradient norm, step AdamW (or bitsandbytes' 8-bit AdamW), step the LR schedule
     (linear warmup, then cosine decay to 0).

Everything a run needs to continue EXACTLY is in each checkpoint: weights, optimizer and scheduler
state, RNG states and the step (the data order is a pure function of seed and epoch, so the step is the
data position). A resumed run ends with the same weights as an uninterrupted one, bitwise on CPU.

Output directory:
  final_model/            the trained reward model (loads with RewardModel.from_pretrained / eval.py)
  best_model_step_N/      the model with the best held-out accuracy so far
  checkpoint_step_N/      model/ + optimizer.pt + trainer_state.json; the newest --save_total_limit kept
  evaluation_report.json  eval.py's report on the final model
  train_config.json, log.jsonl
Every directory is written under a temporary name and renamed into place when complete.
"""
import argparse
import errno
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from errors import ArgumentParser, UserError, check_writable, run_cli
from qwen3 import CONFIGS as MODEL_CONFIGS
from qwen3 import load_checked, read_state_dict
from rm import HEADS, POOLINGS, RewardModel, fsync_dir, replace_dir, write_json_durably


@dataclass
class TrainConfig:
    # model
    model: str = "Qwen/Qwen3-0.6B"           # Hub id or local directory; with from_scratch, a qwen3.CONFIGS name
    from_scratch: bool = False               # random init (the demo): no download at all
    head: str | None = None                  # mlp (default) | linear; None = whatever the checkpoint has
    pooling: str | None = None               # mean (default) | last
    # data
    dataset: list = field(default_factory=lambda: ["Anthropic/hh-rlhf"])
    eval_split: str = "test"                 # "none": no evaluation (e.g. a dataset with a train split only)
    eval_dataset: list | None = None         # held-out sources; default: --dataset at --eval_split
    max_train_samples: int | None = None
    max_eval_samples: int | None = 1000
    max_length: int = 1024
    # optimisation
    batch_size: int = 8                      # pairs per micro-batch, per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-6
    num_epochs: float = 3
    max_steps: int = -1                      # > 0 overrides num_epochs
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    center_rewards_coefficient: float = 0.0
    # memory and speed
    freeze_layers: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    optim_8bit: bool = False
    model_8bit: bool = False
    compile: bool = False
    packing: bool = False
    share_prompt: bool = False               # each pair's prompt computed once (padded or packed batches)
    fsdp: bool = False
    # bookkeeping
    eval_steps: int = 200
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    output_dir: str = "out/rm"
    overwrite_output_dir: bool = False
    resume: str | None = None                # "latest" or a checkpoint path
    seed: int = 42
    device: str | None = None                # default: cuda if available
    use_wandb: bool = False
    wandb_project: str = "qwen3-rm"
    progress: bool = True


# Named configurations: --config NAME starts from these values, and any flag given overrides them.
_06 = dict(model="Qwen/Qwen3-0.6B", batch_size=8, learning_rate=5e-6, num_epochs=3)
_17 = dict(model="Qwen/Qwen3-1.7B", batch_size=4, learning_rate=3e-6, num_epochs=3)
SIZES = {"": dict(max_train_samples=5000, max_length=1024),
         "_small": dict(max_train_samples=1000, max_length=512),
         "_medium": dict(max_train_samples=20000, max_length=1024),
         "_large": dict(max_train_samples=None, max_length=2048)}
CONFIGS = {
    **{f"qwen3_0.6b{s}": {**_06, **v} for s, v in SIZES.items()},
    **{f"qwen3_1.7b{s}": {**_17, **v} for s, v in SIZES.items()},
    "custom": {},
    # The demo: qwen3's "tiny" shape trained from scratch, its vocabulary the demo tokenizer's. Last-token
    # pooling: the eos token attends to the whole conversation, which is what "is this answer on the asked
    # topic?" needs; mean pooling dilutes it with the prompt's tokens (0.88-0.96 held out over 3 seeds,
    # against 0.93-0.98 for last, 1,000 steps each, at lr 2e-3). lr 1e-3: at 2e-3 the run sat on the edge of
    # a plateau (75%: rudeness alone), so rounding-level differences decided the outcome (--packing 0.850,
    # --share_prompt 0.864 against 0.984 padded); at 1e-3 held-out accuracy was 0.974 padded, 0.984
    # --packing, 0.988 --share_prompt, 0.978 --bf16, 0.998 / 0.994 with seeds 1 / 7.
    "demo": dict(model="tiny", from_scratch=True, pooling="last", dataset=["demo"], max_train_samples=None,
                 max_eval_samples=500, max_length=128, batch_size=32, learning_rate=1e-3, num_epochs=8,
                 warmup_ratio=0.05, weight_decay=0.0, eval_steps=250, save_steps=1000, logging_steps=50,
                 output_dir="out/demo", device="cpu"),
}


# ----------------------------------------------------------------------------------------------
# Checking the configuration: every mistake found here ends the run before anything is written.


def validate(cfg: TrainConfig):
    # Comparisons are written so that NaN fails them too (NaN > 0 is False), and inf is refused.
    for name in ("batch_size", "gradient_accumulation_steps", "max_length", "eval_steps", "save_steps",
                 "logging_steps", "save_total_limit"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be a positive integer (got {getattr(cfg, name)})")
    if not 0 < cfg.learning_rate < math.inf:
        raise UserError(f"--learning_rate must be positive and finite (got {cfg.learning_rate}); "
                        "e.g. 5e-6 for Qwen3-0.6B")
    if cfg.max_steps <= 0 and not 0 < cfg.num_epochs < math.inf:
        raise UserError(f"--num_epochs must be positive and finite (got {cfg.num_epochs}), or set --max_steps")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be a positive integer (got {getattr(cfg, name)})")
    if not 0 <= cfg.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})")
    for name in ("weight_decay", "max_grad_norm", "center_rewards_coefficient", "freeze_layers"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise UserError(f"--{name} must be a number >= 0 (got {getattr(cfg, name)})")
    if cfg.head not in (None, *HEADS):
        raise UserError(f"--head must be one of {HEADS} (got {cfg.head!r})")
    if cfg.pooling not in (None, *POOLINGS):
        raise UserError(f"--pooling must be one of {POOLINGS} (got {cfg.pooling!r})")
    if cfg.from_scratch and cfg.model not in MODEL_CONFIGS:
        raise UserError(f"--from_scratch needs --model to name one of {sorted(MODEL_CONFIGS)}")
    if cfg.model_8bit and cfg.fsdp:
        raise UserError("--8bit_model cannot be combined with --fsdp (int8 weights cannot be sharded); drop one")
    if cfg.resume and cfg.overwrite_output_dir:
        raise UserError("--resume and --overwrite_output_dir contradict each other; pick one")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--bf16 needs a GPU with bfloat16 support ({torch.cuda.get_device_name()} has none); "
                        "drop --bf16")
    if cfg.optim_8bit or cfg.model_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--8bit_optim/--8bit_model need bitsandbytes: pip install bitsandbytes") from None
    if cfg.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--use_wandb needs the wandb package: pip install wandb (or drop --use_wandb)") from None
    return device


RUN_FILES = re.compile(r"^(checkpoint_step_\d+|best_model_step_\d+|final_model|evaluation_report\.json|"
                       r"train_config\.json|log\.jsonl)$")


# What a killed write leaves behind: temporary siblings of the files above (rm.replace_dir, save_checkpoint,
# eval.write_report, the write probe). Never complete, never read; removed when the next run starts.
LEFTOVERS = re.compile(r"^\.(checkpoint_step_\d+|best_model_step_\d+|final_model|evaluation_report\.json|"
                       r"train_config\.json|log\.jsonl)\.(tmp|old)-|^\.write-test-\d+$")


def run_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if RUN_FILES.match(p.name)) if out.is_dir() else []


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Refuse to mix two runs in one directory; make sure we can write there before training starts.
    Only checks: the directory is left as it was found (created, cleaned, replaced by claim_output_dir
    once the data and the model have loaded), so a run that fails on bad input writes nothing."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; pass a directory")
    ours = run_files(out)
    if ours and not cfg.resume and not cfg.overwrite_output_dir:
        raise UserError(f"--output_dir {out} already holds another run ({', '.join(ours[:3])}); "
                        "pass --resume to continue it, --overwrite_output_dir to replace it, "
                        "or choose another --output_dir")
    check_writable(out, f"to --output_dir {out}", "choose a writable directory")
    return out


def claim_output_dir(cfg: TrainConfig, out: Path, resume_step: int | None):
    """Just before the first write: create the directory, replace a previous run (--overwrite_output_dir),
    delete what killed writes left behind, and on --resume cut log.jsonl back to the checkpoint's step
    (the steps after it are trained, and logged, again; a line cut by a kill goes too)."""
    with disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite_output_dir and not cfg.resume:
            for name in run_files(out):
                remove(out / name)
        for p in out.iterdir():
            if LEFTOVERS.match(p.name):
                remove(p)
        if resume_step is not None and (out / "log.jsonl").is_file():
            kept = [json.dumps(r) + "\n" for r in read_log(out)
                    if isinstance(r, dict) and r.get("step", math.inf) <= resume_step]
            tmp = out / f".log.jsonl.tmp-{os.getpid()}"
            tmp.write_text("".join(kept))
            os.replace(tmp, out / "log.jsonl")


def remove(path: Path):
    """Delete a file or a directory tree. A directory is first renamed to a hidden temporary name, so a kill
    halfway through never leaves a half-deleted checkpoint under its real name."""
    if path.is_dir() and not path.is_symlink():
        if not path.name.startswith("."):
            hidden = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(path, hidden)
            path = hidden
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def read_log(out: Path) -> list[dict]:
    """The records of log.jsonl (the run's history: kept on disk, not in memory or in checkpoints)."""
    records = []
    if (out / "log.jsonl").is_file():
        for line in (out / "log.jsonl").read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


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


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json is written last), oldest first. Temporary directories of
    a killed write (.checkpoint_step_N.tmp-PID) never count."""
    found = [p for p in out.glob("checkpoint_step_*") if re.fullmatch(r"checkpoint_step_\d+", p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("_", 1)[1]))


def find_resume_checkpoint(cfg: TrainConfig, out: Path) -> Path:
    if cfg.resume in ("latest", "auto", "true", "1"):
        ckpts = checkpoint_dirs(out)
        if not ckpts:
            if run_files(out):  # a run that stopped before its first checkpoint: nothing to continue
                raise UserError(f"--resume: {out} holds a run but no complete checkpoint to resume from "
                                f"(it stopped before its first one); start it again with --overwrite_output_dir")
            raise UserError(f"--resume: no checkpoint in {out} to resume from; start without --resume")
        return ckpts[-1]
    path = Path(cfg.resume)
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


def save_checkpoint(out: Path, step: int, model: RewardModel, optimizer_state: dict, scheduler,
                    trainer_state: dict, save_total_limit: int) -> Path:
    """checkpoint_step_N/: model/ (a loadable reward model), optimizer.pt, trainer_state.json (last)."""
    final = out / f"checkpoint_step_{step}"
    tmp = out / f".checkpoint_step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp / "model")
        with open(tmp / "optimizer.pt", "wb") as f:  # a file object: a full disk surfaces as OSError(ENOSPC)
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_states()}, f)
        write_json_durably(tmp / "trainer_state.json", trainer_state)
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out)[:-save_total_limit]:  # bounded disk: keep the newest few
        remove(old)
    return final


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun) helpers: with a single process all of these are no-ops.


def setup_distributed(device: torch.device):
    """Return (rank, world_size). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nothing set = one process."""
    if "RANK" not in os.environ:
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def any_process(flag: bool, device) -> bool:
    """True on every process if `flag` is True on any of them (a collective: every process must call it)."""
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


class rank_0_errors:
    """`with rank_0_errors(world, device):` around what only rank 0 does (output directory checks,
    writes), in place of the barrier after it. A UserError raised there on rank 0 ends every process at
    once with exit status 2 (rank 0 prints the message), where the others would wait at the next
    collective until torchrun tears them down (nccl) or die with a 'Connection closed by peer' traceback
    (gloo). One process: nothing to share."""
    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if self.world == 1 or (e is not None and not isinstance(e, UserError)):
            return False  # a bug keeps its traceback
        # Every process waits here for rank 0's outcome. (broadcast_object_list carried the message once, but
        # let gloo abort at exit under load.)
        if not any_process(e is not None, self.device):
            return False
        dist.barrier()
        dist.destroy_process_group()  # every process is here: leave cleanly, without nccl's exit warning
        if e is not None:
            return False  # rank 0 raises its own error (its traceback with --debug)
        echo = UserError("rank 0 stopped the run; its message says why")
        echo.quiet = True  # only rank 0 prints
        raise echo from None


def all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world_size
    return values


# ----------------------------------------------------------------------------------------------
# Building the pieces


def build_model(cfg: TrainConfig, tokenizer_for_scratch=None) -> RewardModel:
    if cfg.from_scratch:
        import dataclasses
        config = dataclasses.replace(MODEL_CONFIGS[cfg.model], vocab_size=tokenizer_for_scratch.vocab_size)
        torch.manual_seed(cfg.seed)
        model = RewardModel(config, head=cfg.head or "mlp", pooling=cfg.pooling or "mean")
        model.model.init_weights(seed=cfg.seed)
        model.init_head(cfg.seed)
        model.tokenizer = tokenizer_for_scratch
        return model
    model = RewardModel.from_pretrained(cfg.model, head=cfg.head, pooling=cfg.pooling, seed=cfg.seed)
    if model.tokenizer is None:
        raise UserError(f"{cfg.model} has no tokenizer.json; a model directory must hold its tokenizer files")
    return model


def make_optimizer(cfg: TrainConfig, model, device):
    """AdamW with weight decay on matrices only (not on norms and biases). Frozen parameters get no state."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optim_8bit:
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda")


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup from 0, then cosine decay to 0."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# The loop


class ForcedStop(KeyboardInterrupt):
    """A second Ctrl-C while the first one's checkpoint is pending: stop at once, without that checkpoint.
    The message (rank 0's; empty on the others) says what is on disk."""


def train(cfg: TrainConfig) -> dict:
    import data
    from eval import evaluate, write_report

    device = validate(cfg)
    rank, world = setup_distributed(device)
    is_main = rank == 0
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(cfg.output_dir)
    with rank_0_errors(world, device):  # one process checks (and probes) the directory; all hear of failure
        if is_main:
            prepare_output_dir(cfg)
    resume_from = find_resume_checkpoint(cfg, out) if cfg.resume else None
    log = print if is_main else (lambda *a, **k: None)

    # ---- data: pairs -> token ids; every skipped or dropped pair is counted and reported
    tokenizer = data.demo_tokenizer() if cfg.from_scratch else None
    model = build_model(cfg, tokenizer)
    tokenizer = model.tokenizer
    train_stats, eval_stats = data.DataStats(), data.DataStats()
    train_pairs = data.load_pairs(cfg.dataset, split="train", max_samples=cfg.max_train_samples, stats=train_stats)
    evaluating = cfg.eval_split != "none"
    eval_sources = list(cfg.eval_dataset or cfg.dataset)
    eval_pairs = data.load_pairs(eval_sources, split=cfg.eval_split, max_samples=cfg.max_eval_samples,
                                 stats=eval_stats) if evaluating else []
    train_items = data.tokenize_pairs(train_pairs, tokenizer, cfg.max_length, train_stats)
    # Tokenised once, here: a held-out set that cannot be evaluated fails now, not at the first evaluation.
    eval_items = data.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, eval_stats) if evaluating else []
    for items, pairs, split, sources in ((train_items, train_pairs, "train", cfg.dataset),
                                         (eval_items, eval_pairs, cfg.eval_split, eval_sources)):
        if not items and (split == "train" or evaluating):
            raise UserError(f"all {len(pairs)} '{split}' pairs of {', '.join(sources)} are longer than "
                            f"--max_length {cfg.max_length} tokens (a response and its eos must fit); "
                            "raise --max_length")
    log(f"data: {len(train_items)} training pairs, {len(eval_items)} eval pairs | train {train_stats.report()} | "
        f"eval {eval_stats.report()}")
    lengths = [len(it.chosen_ids) + len(it.rejected_ids) for it in train_items]
    # One optimizer step consumes one "step batch" of batch_size x accumulation x processes pairs. The
    # order of step batches depends only on the seed and the epoch, so 1 process x batch 8, 2 processes
    # x batch 4 and batch 4 x 2 accumulation steps all see exactly the same pairs at every step.
    step_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(train_items) / step_batch)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(steps_per_epoch * cfg.num_epochs))
    epoch_orders = {}

    def micro_batches(step: int) -> list:
        """This process's micro-batches of optimizer step `step`, each with the number of pairs in the
        whole micro-step (all processes): a pure function of (seed, step), which makes resuming exact."""
        epoch, j = divmod(step, steps_per_epoch)
        if epoch not in epoch_orders:
            epoch_orders.clear()
            epoch_orders[epoch] = data.batch_order(lengths, step_batch, cfg.seed, epoch)
        idx = epoch_orders[epoch][j]
        per_micro = cfg.batch_size * world
        chunks = [idx[i:i + per_micro] for i in range(0, len(idx), per_micro)]
        return [(chunk[rank::world], len(chunk)) for chunk in chunks]

    # ---- model, memory options, optimizer, schedule
    model.extra_config = {"dataset": list(cfg.dataset), "eval_dataset": eval_sources, "max_length": cfg.max_length,
                          "eval_split": cfg.eval_split, "share_prompt": cfg.share_prompt}
    if resume_from is not None:  # weights first, then the options that change the modules
        load_checked(model, read_model_state(resume_from / "model"), where=str(resume_from / "model"))
    model.freeze_layers(cfg.freeze_layers)
    model.to(device)
    if cfg.model_8bit:  # after the move: bitsandbytes quantises while placing the weights on the device
        model.quantize_8bit()
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    train_model = wrap_distributed(model, cfg, device, world)
    if cfg.compile:  # each block compiled in place: one compilation for all of them (see Qwen3.compile_blocks)
        model.model.compile_blocks()
    optimizer = make_optimizer(cfg, train_model, device)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {cfg.model} | head {model.head_type}, pooling {model.pooling} | "
        f"{n_trainable / 1e6:.2f}M trainable parameters | device {device}, {world} process(es)")

    step, best_accuracy = 0, -1.0
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        check_same_run(state, cfg, step_batch)
        saved = torch.load(resume_from / "optimizer.pt", weights_only=False, map_location="cpu")
        load_optimizer_state(optimizer, train_model, saved["optimizer"], cfg)
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_states(saved["rng"])
        step, best_accuracy = state["step"], state["best_accuracy"]
        log(f"resumed from {resume_from} at step {step}/{total_steps}")
    with rank_0_errors(world, device):
        if is_main:  # the first write into the output directory: every input has been checked by now
            claim_output_dir(cfg, out, step if resume_from is not None else None)
            with disk_errors(out / "train_config.json"):
                write_report(out / "train_config.json", asdict(cfg))  # atomic JSON write
    wandb_run = None
    if cfg.use_wandb and is_main:
        import wandb
        wandb_run = wandb.init(project=cfg.wandb_project, config=asdict(cfg))

    # Ctrl-C / SIGTERM: finish the step in flight, checkpoint, exit with a resume line. A second Ctrl-C means
    # "now": it raises wherever the loop is, abandoning that checkpoint. Safe even mid-write: checkpoints are
    # written under a hidden temporary name (removed on the way out) and renamed into place only when complete.
    stop = {"signal": None}
    def request_stop(signum, frame):
        if signum == signal.SIGINT and stop["signal"] is not None:
            raise ForcedStop()
        stop["signal"] = signal.Signals(signum).name
    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint_now():
        full = gather_full_state(train_model, cfg, world)
        opt_state = gather_optimizer_state(optimizer, train_model, cfg, world)
        with rank_0_errors(world, device):  # e.g. a full disk on rank 0 ends every process
            if is_main:
                # No history here: it lives in log.jsonl, so a checkpoint's size does not grow with the step.
                trainer_state = {"step": step, "best_accuracy": best_accuracy,
                                 "config": asdict(cfg), "total_steps": total_steps, "step_batch": step_batch,
                                 "world_size": world}
                with disk_errors(out / f"checkpoint_step_{step}"):
                    save_checkpoint(out, step, unsharded(model, full), opt_state, scheduler, trainer_state,
                                    cfg.save_total_limit)
        return out / f"checkpoint_step_{step}"

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    collate = data.collate_packed if cfg.packing else data.collate  # either takes share_prompt
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    window = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < total_steps:
            # -- one optimizer step over gradient_accumulation_steps micro-batches
            micro = micro_batches(step)
            pairs_in_step = sum(n for _, n in micro)          # over all micro-batches and processes
            metrics = torch.zeros(4, device=device)    # loss, accuracy, margin (pair-weighted), tokens
            for i, (idx, _) in enumerate(micro):
                # Weight each micro-batch by its share of the step's pairs, so accumulation (and data
                # parallelism, which averages over processes) equals one big batch exactly. A process
                # whose slice of a short last batch is empty still runs (on a stand-in pair, weight 0),
                # because every process must join each gradient all-reduce.
                weight = len(idx) / pairs_in_step * world
                items = [train_items[j] for j in idx] or [train_items[0]]
                batch = to_device(collate(items, tokenizer.pad_id, share_prompt=cfg.share_prompt), device)
                sync = i == len(micro) - 1 or world == 1
                with maybe_no_sync(train_model, sync, cfg), autocast:
                    outputs = train_model(**batch, pairs=True, center_rewards_coefficient=cfg.center_rewards_coefficient)
                (outputs["loss"] * weight).backward()
                tokens = batch["attention_mask"].sum() if "attention_mask" in batch else (batch["sequence_ids"] >= 0).sum()
                metrics += torch.stack([outputs["loss"].detach() * weight, outputs["accuracy"] * weight,
                                        outputs["margin"].detach() * weight, tokens * world * (len(idx) > 0)])
            metrics = all_reduce_mean(metrics, world)
            loss_value = metrics[0].item()
            stop_if_not_finite("loss", loss_value, step + 1, out, ".")
            grad_norm = clip_grad_norm(train_model, cfg.max_grad_norm)
            # a finite loss can still have an overflowing gradient
            stop_if_not_finite("gradient norm", float(grad_norm), step + 1, out, " before the update.")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for k, v in zip(("loss", "accuracy", "margin"), metrics.tolist()):
                window[k] += v
            window["n"] += 1
            window["tokens"] += int(metrics[3])                 # summed over processes
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{metrics[1].item():.3f}")

            # -- logging
            if step % cfg.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window["t0"]
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                          **{k: round(window[k] / window["n"], 5) for k in ("loss", "accuracy", "margin")},
                          "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 4),
                          "tokens_per_s": round(window["tokens"] / elapsed, 1),
                          "peak_mem_gib": round(peak_memory_gib(device), 3)}
                if is_main:
                    with disk_errors(out / "log.jsonl"):
                        append_log(out, record)
                    if wandb_run:
                        wandb_run.log(record, step=step)
                    msg = " | ".join(f"{k} {v}" for k, v in record.items())
                    (bar.write if bar is not None else print)(msg)
                window.update(loss=0.0, accuracy=0.0, margin=0.0, n=0, tokens=0, t0=time.perf_counter())

            # -- periodic evaluation on the held-out split; keep the best model
            if eval_items and (step % cfg.eval_steps == 0 or step == total_steps):
                full = gather_full_state(train_model, cfg, world)
                with rank_0_errors(world, device):  # e.g. a full disk while saving the best model
                    if is_main:
                        current = unsharded(model, full)
                        report = evaluate(current, eval_items,
                                          batch_size=cfg.batch_size * 2, max_length=cfg.max_length, bf16=cfg.bf16,
                                          progress=False, stats=eval_stats, share_prompt=cfg.share_prompt)
                        record = {"step": step, "eval_accuracy": report["accuracy"],
                                  "eval_loss": report["loss"], "eval_margin": report["margin"]["mean"]}
                        with disk_errors(out / "log.jsonl"):
                            append_log(out, record)
                        if wandb_run:
                            wandb_run.log(record, step=step)
                        (bar.write if bar is not None else print)(
                            f"eval step {step}: accuracy {record['eval_accuracy']:.4f} | loss {record['eval_loss']:.4f}"
                            f" | margin {record['eval_margin']:.4f}")
                        if record["eval_accuracy"] > best_accuracy:
                            best_accuracy = record["eval_accuracy"]
                            best = out / f"best_model_step_{step}"
                            with disk_errors(best):  # the new best first, then the old one goes: never none
                                current.save_pretrained(best)
                                for old in out.glob("best_model_step_*"):
                                    if old.name != best.name:
                                        remove(old)

            saved = step % cfg.save_steps == 0 and step < total_steps
            if saved:
                checkpoint_now()
            if world > 1:  # every process must agree to stop at the same step (checkpointing is collective)
                if any_process(stop["signal"] is not None, device):
                    stop["signal"] = stop["signal"] or "SIGTERM"
            if stop["signal"] and step < total_steps:
                path = out / f"checkpoint_step_{step}" if saved else checkpoint_now()  # not the same one twice
                log(f"\n{stop['signal']} received: saved {path} at step {step}/{total_steps}. Resume with:\n"
                    f"  python train.py {shlex.join(resume_args(sys.argv[1:]))} --resume {shlex.quote(str(path))}")
                return {"stopped_at": step, "checkpoint": str(path), "signal": stop["signal"]}
    except ForcedStop:
        raise ForcedStop(forced_stop_message(out, step, total_steps, stop["signal"]) if is_main else "") from None
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()

    # ---- the end: final model and its evaluation report
    result = {"step": step, "output_dir": str(out), "final_model": str(out / "final_model")}
    full = gather_full_state(train_model, cfg, world)
    if is_main:
        final_model = unsharded(model, full)
        with disk_errors(out / "final_model"):
            final_model.save_pretrained(out / "final_model")
        if eval_items:
            report = evaluate(final_model, eval_items, batch_size=cfg.batch_size * 2, max_length=cfg.max_length,
                              bf16=cfg.bf16, progress=cfg.progress, stats=eval_stats, share_prompt=cfg.share_prompt)
            report.update(checkpoint=str(out / "final_model"), dataset=eval_sources, split=cfg.eval_split,
                          max_length=cfg.max_length, max_samples=cfg.max_eval_samples)
            with disk_errors(out / "evaluation_report.json"):
                write_report(out / "evaluation_report.json", report)
            result["eval_accuracy"] = report["accuracy"]
            result["report"] = str(out / "evaluation_report.json")
            log(f"final: eval accuracy {report['accuracy']:.4f} on {report['num_pairs']} pairs | "
                f"model saved to {out / 'final_model'}")
        else:
            log(f"final: model saved to {out / 'final_model'} (no evaluation: --eval_split none)")
        if wandb_run:
            wandb_run.finish()
    # Not under rank_0_errors: one more collective right before destroy_process_group let gloo abort at exit
    # now and then (1 run in 18 under load); a failure here ends rank 0, and torchrun then stops the others.
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    result["history"] = read_log(out) if is_main else []  # the whole run's records, resumed parts included
    return result


def stop_if_not_finite(what: str, value: float, step: int, out: Path, stopped: str):
    if not math.isfinite(value):
        last = checkpoint_dirs(out)
        raise UserError(f"the {what} became {value} at step {step}; training stopped{stopped} Last good "
                        f"checkpoint: {last[-1] if last else 'none'}. Lower --learning_rate or check the data, "
                        "then --resume")


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
    return (f"{head}, {done}; the last saved checkpoint {last} is intact. Resume with: "
            f"python train.py {shlex.join(resume_args(sys.argv[1:]))} --resume {shlex.quote(str(last))}")


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


def read_model_state(model_dir: Path) -> dict:
    from rm import MODULE_NAMES
    return {MODULE_NAMES.get(k, k): v for k, v in read_state_dict(model_dir, torch.float32).items()}


def check_same_run(saved: dict, cfg: TrainConfig, step_batch: int):
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


def append_log(out: Path, record: dict):
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def clip_grad_norm(model, max_norm: float):
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


# ---- data parallel wrappers (DDP, FSDP2); plain passthroughs for one process ---------------------


def wrap_distributed(model, cfg: TrainConfig, device, world: int):
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:  # shard block by block: one block's full weights live at a time
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


class maybe_no_sync:
    """DDP: skip the gradient all-reduce on micro-steps before the last one of an accumulation."""
    def __init__(self, model, sync: bool, cfg):
        self.ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else None
        self.fsdp_model = model if (cfg.fsdp and hasattr(model, "set_requires_gradient_sync")) else None
        self.sync = sync

    def __enter__(self):
        if self.fsdp_model is not None:
            self.fsdp_model.set_requires_gradient_sync(self.sync)
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def gather_full_state(train_model, cfg, world):
    """Under FSDP, gather the full (unsharded) model state on CPU for saving; None otherwise."""
    if not (world > 1 and cfg.fsdp):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_optimizer_state(optimizer, train_model, cfg, world):
    if not (world > 1 and cfg.fsdp):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(train_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(optimizer, train_model, state, cfg):
    if not (cfg.fsdp and dist.is_initialized()):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(train_model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def unsharded(model: RewardModel, full_state: dict | None) -> RewardModel:
    """The model to save or evaluate: `model` itself, or under FSDP a copy holding the gathered full
    (unsharded) weights."""
    if full_state is None:
        return model
    with torch.device("meta"):
        shell = RewardModel(model.config, model.head_type, model.pooling)
    shell.load_state_dict(full_state, assign=True)
    shell.tokenizer, shell.extra_config = model.tokenizer, model.extra_config
    return shell


# ----------------------------------------------------------------------------------------------
# Command line: argparse builds a TrainConfig; the named config supplies defaults, flags override.


def parse_args(argv=None) -> TrainConfig:
    p = ArgumentParser(prog="train.py", description="Train a Qwen3 reward model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    S = argparse.SUPPRESS  # flags not given stay unset, so the named config's value applies
    p.add_argument("--config", default="custom", choices=sorted(CONFIGS), help="named configuration to start from")
    p.add_argument("--model", "--model_name", dest="model", default=S, help="Hub repo id or local checkpoint directory")
    p.add_argument("--from_scratch", action="store_true", default=S, help="random init of a qwen3.CONFIGS shape (tiny, 0.6b, 1.7b) with the demo's tokenizer: for the demo and tests")
    p.add_argument("--head", default=S, choices=HEADS, help="reward head (default: the checkpoint's, else mlp)")
    p.add_argument("--pooling", default=S, choices=POOLINGS, help="pooling (default: the checkpoint's, else mean)")
    p.add_argument("--dataset", nargs="+", default=S, help="one or more sources: Hub dataset ids, files, dirs, globs, 'demo'")
    p.add_argument("--eval_split", default=S, help="held-out split for evaluation; 'none' turns evaluation off")
    p.add_argument("--eval_dataset", nargs="+", default=S,
                   help="held-out sources (default: --dataset); needed when --dataset is a file without splits")
    p.add_argument("--max_train_samples", type=int, default=S, help="use at most this many training pairs")
    p.add_argument("--max_eval_samples", type=int, default=S, help="evaluate on at most this many pairs")
    p.add_argument("--max_length", type=int, default=S, help="max tokens per sequence (prompt cut from the left)")
    p.add_argument("--batch_size", type=int, default=S, help="pairs per micro-batch per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=S, help="micro-batches per optimizer step")
    p.add_argument("--learning_rate", type=float, default=S, help="peak learning rate")
    p.add_argument("--num_epochs", type=float, default=S, help="passes over the training pairs")
    p.add_argument("--max_steps", type=int, default=S, help="optimizer steps; > 0 overrides --num_epochs")
    p.add_argument("--warmup_ratio", type=float, default=S, help="share of steps with linear warmup")
    p.add_argument("--weight_decay", type=float, default=S, help="AdamW weight decay (matrices only)")
    p.add_argument("--max_grad_norm", type=float, default=S, help="gradient clipping (0 = off)")
    p.add_argument("--center_rewards_coefficient", type=float, default=S, help="weight of mean((r_c + r_r)^2)")
    p.add_argument("--freeze_layers", type=int, default=S, help="freeze the embeddings and the first N blocks")
    p.add_argument("--bf16", action="store_true", default=S, help="bf16 autocast over fp32 master weights")
    p.add_argument("--gradient_checkpointing", action="store_true", default=S, help="recompute activations in backward")
    p.add_argument("--8bit_optim", dest="optim_8bit", action="store_true", default=S, help="bitsandbytes AdamW8bit")
    p.add_argument("--8bit_model", dest="model_8bit", action="store_true", default=S,
                   help="frozen int8 backbone (bitsandbytes Linear8bitLt); trains the head and norms")
    p.add_argument("--compile", action="store_true", default=S,
                   help="torch.compile each transformer block (Qwen3.compile_blocks)")
    p.add_argument("--packing", action="store_true", default=S,
                   help="padding-free batches: all sequences of a micro-batch in one row (data.collate_packed)")
    p.add_argument("--share_prompt", action="store_true", default=S,
                   help="each pair's prompt goes through the model once, not twice, and no padding does (same "
                        "results); attention runs on padded rows, or with --packing on packed ones")
    p.add_argument("--fsdp", action="store_true", default=S, help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--eval_steps", type=int, default=S, help="evaluate every N steps")
    p.add_argument("--save_steps", type=int, default=S, help="checkpoint every N steps")
    p.add_argument("--save_total_limit", type=int, default=S, help="keep the newest N checkpoints")
    p.add_argument("--logging_steps", type=int, default=S, help="log every N steps")
    p.add_argument("--output_dir", default=S, help="where checkpoints and the final model go")
    p.add_argument("--overwrite_output_dir", action="store_true", default=S, help="replace a previous run there")
    p.add_argument("--resume", nargs="?", const="latest", default=S,
                   help="continue from the latest checkpoint in --output_dir, or from the given checkpoint")
    p.add_argument("--seed", type=int, default=S, help="random seed (init, data order)")
    p.add_argument("--device", default=S, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--use_wandb", action="store_true", default=S, help="log to Weights & Biases")
    p.add_argument("--wandb_project", default=S, help="W&B project name")
    p.add_argument("--no_progress", dest="progress", action="store_false", default=S, help="no progress bar")
    p.add_argument("--eval_only", action="store_true", help="only evaluate --model_path (same report as eval.py)")
    p.add_argument("--model_path", help="checkpoint to evaluate with --eval_only")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    args = vars(p.parse_args(argv))
    name, eval_only, model_path = args.pop("config"), args.pop("eval_only"), args.pop("model_path")
    args.pop("debug")
    cfg = TrainConfig(**{**CONFIGS[name], **args})
    return cfg, eval_only, model_path, set(args) | set(CONFIGS[name])


def main(argv=None):
    cfg, eval_only, model_path, given = parse_args(argv)
    if eval_only:  # exactly eval.py; options not given fall back to what the checkpoint was trained with
        if not model_path:
            raise UserError("--eval_only needs --model_path CHECKPOINT")
        import eval as eval_cli
        eval_args = [model_path, "--split", cfg.eval_split, "--batch_size", str(cfg.batch_size * 2)]
        if cfg.eval_split == "none":
            raise UserError("--eval_only with --eval_split none evaluates nothing; pass a split such as test")
        if "eval_dataset" in given or "dataset" in given:
            eval_args += ["--dataset", *(cfg.eval_dataset or cfg.dataset)]
        if "max_length" in given:
            eval_args += ["--max_length", str(cfg.max_length)]
        if cfg.max_eval_samples:
            eval_args += ["--max_samples", str(cfg.max_eval_samples)]
        if cfg.bf16:
            eval_args.append("--bf16")
        if cfg.share_prompt:
            eval_args.append("--share_prompt")
        return eval_cli.main(eval_args)
    try:
        result = train(cfg)
    except ForcedStop as e:  # like the first Ctrl-C: exit status 130, not 0
        if str(e):
            print(e, file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if "stopped_at" in result:  # stopped by a signal, checkpoint saved: not a finished run (`&& eval.py` must not go on)
        sys.exit(128 + signal.Signals[result["signal"]].value)


if __name__ == "__main__":
    run_cli(main)
