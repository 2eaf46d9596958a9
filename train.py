"""Train a Qwen3 reward model: one hand-written loop, readable top to bottom.

    python train.py --config demo                        # tiny model, synthetic task, CPU, ~1.5 minutes
    python train.py --model Qwen/Qwen3-0.6B --bf16       # the real thing, on Anthropic/hh-rlhf
    torchrun --nproc_per_node=8 train.py --config qwen3_1.7b --bf16 --fsdp

One optimizer step: take the next global batch of preference pairs (length-grouped, deterministic for the
seed; under torchrun each process takes its slice); for each micro-batch, chosen + rejected in ONE forward
pass -> rewards -> pairwise loss -> backward; clip the gradient norm, step AdamW and the LR schedule
(linear warmup, cosine decay to 0). A checkpoint holds everything needed to continue exactly, so a
resumed run ends with the same weights as an uninterrupted one (bitwise on CPU).

Output directory: final_model/, best_model_step_N/, checkpoint_step_N/ (the newest --save_total_limit),
evaluation_report.json, train_config.json, log.jsonl. The machinery lives apart: checkpoint.py (output
directory, checkpoints, resume, stopping on a signal), distributed.py (torchrun, DDP/FSDP2).
"""
import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

import data
from support import hub, readers, scoring
from support.checkpoint import (MAY_CHANGE, SAME_RUN, ForcedStop, SignalStop, append_log, check_same_data, check_same_run,
                        checkpoint_dirs, claim_output_dir, disk_errors, find_resume_checkpoint, forced_stop,
                        prepare_output_dir, read_log, read_trainer_state, release_output_dir, remove,
                        restore_training_state, save_checkpoint, stopped_message)
from support.distributed import (all_reduce_mean, end_distributed, gather_model_state, gather_optimizer_state, init_wandb,
                         is_main_process, load_optimizer_state, no_sync, print0, rank_0_errors, setup_distributed,
                         unsharded, wrap)
from support.errors import ArgumentParser, UserError, run_cli
from support.fileio import write_json_atomic
from support.lora import (add_lora, base_fingerprint, check_base, check_options, load_adapter_state_dict, read_adapters,
                  save_adapters)
from support.packing import choose_collate
from qwen3 import SHAPES as MODEL_SHAPES
from rm import HEADS, POOLINGS, RewardModel, pairwise_loss
from support import export, weights


@dataclass
class TrainConfig:
    # model
    model: str = "Qwen/Qwen3-0.6B"           # Hub id or local directory; with from_scratch, a qwen3.SHAPES name
    from_scratch: bool = False               # random init (the demo): no download at all
    head: str | None = None                  # mlp (default) | linear; None = whatever the checkpoint has
    pooling: str | None = None               # mean (default) | last
    # data
    dataset: list = field(default_factory=lambda: ["Anthropic/hh-rlhf"])
    eval_split: str = "test"                 # "none": no evaluation (e.g. a dataset with a train split only)
    eval_dataset: list | None = None         # held-out sources; default: --dataset at --eval_split
    eval_fraction: float | None = None       # held-out share of the training pairs, by content hash; 0.05
                                             # when the eval source is the training files (load_data)
    max_train_samples: int | None = None
    max_eval_samples: int | None = 1000
    max_length: int = 1024
    chat_template: str = "auto"              # conversational rows: auto (the model's template) | none | PATH
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
    # LoRA (lora.py): low-rank adapters on the frozen backbone; the head trains fully
    lora_rank: int | None = None             # None: no LoRA, every parameter trains
    lora_alpha: float | None = None          # None: 2 x rank
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,gate,up,down"
    save_adapters: bool = False              # also write final_adapters/ (the adapters and head alone)
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
MODELS = {"qwen3_0.6b": dict(model="Qwen/Qwen3-0.6B", batch_size=8, learning_rate=5e-6, num_epochs=3),
          "qwen3_1.7b": dict(model="Qwen/Qwen3-1.7B", batch_size=4, learning_rate=3e-6, num_epochs=3)}
SIZES = {"": dict(max_train_samples=5000, max_length=1024),
         "_small": dict(max_train_samples=1000, max_length=512),
         "_medium": dict(max_train_samples=20000, max_length=1024),
         "_large": dict(max_train_samples=None, max_length=2048)}
CONFIGS = {
    **{f"{name}{size}": {**model, **data_size} for name, model in MODELS.items() for size, data_size in SIZES.items()},
    "custom": {},
    # The demo: qwen3's "tiny" shape trained from scratch, its vocabulary the demo tokenizer's. Last-token
    # pooling: the eos token attends to the whole conversation, which is what "is this answer on the asked
    # topic?" needs; mean pooling dilutes it with the prompt's tokens. Why lr 1e-3: BENCHMARKS.md.
    "demo": dict(model="tiny", from_scratch=True, pooling="last", dataset=["demo"], max_train_samples=None,
                 max_eval_samples=500, max_length=128, batch_size=32, learning_rate=1e-3, num_epochs=8,
                 warmup_ratio=0.05, weight_decay=0.0, eval_steps=250, save_steps=1000, logging_steps=50,
                 output_dir="out/demo", device="cpu"),
}


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says. Returns step, output_dir, final_model, eval_accuracy, report and history (the
    records of log.jsonl); after a Ctrl-C or SIGTERM, stopped_at, checkpoint and signal instead."""
    device = validate(cfg)
    rank, world, device = setup_distributed(device)
    out = Path(cfg.output_dir)
    with rank_0_errors(device):  # one process checks (and probes) the directory; every process hears of a failure
        if rank == 0:
            prepare_output_dir(out, resume=bool(cfg.resume), overwrite=cfg.overwrite_output_dir)
    resume_from = find_resume_checkpoint(cfg.resume, out) if cfg.resume else None

    # ---- the model and the data: pairs -> token ids, in an order fixed by the seed
    model = build_model(cfg)
    train_items, held_out, data_read = load_data(cfg, model.tokenizer)  # a --chat_template PATH becomes the tokenizer's
    step_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world  # pairs per optimizer step
    batches = StepBatches(train_items, step_batch, cfg.seed)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(batches.steps_per_epoch * cfg.num_epochs))
    model.provenance = {"dataset": list(cfg.dataset), "eval_dataset": held_out.sources, "eval_split": cfg.eval_split,
                        "eval_fraction": cfg.eval_fraction, "max_length": cfg.max_length,
                        "share_prompt": cfg.share_prompt}

    # ---- what trains it: the (wrapped) model, the optimizer, the schedule; on --resume, their saved states
    if resume_from is not None:  # before its weights load: another model or other data is refused by name
        check_resume(resume_from, cfg, step_batch, total_steps, data_read)
    train_model = prepare_model(model, cfg, device, world, resume_from)
    optimizer = make_optimizer(cfg, train_model, device)
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    print0(f"model: {cfg.model} | head {model.head_type}, pooling {model.pooling} | {n_trainable / 1e6:.2f}M of "
           f"{n_total / 1e6:.2f}M parameters train | device {device}, {world} process(es)")
    step, best_accuracy, last_report = 0, -1.0, None  # last_report: the held-out report of the last step
    if resume_from is not None:
        step, best_accuracy, changed = resume_training(resume_from, cfg, optimizer, scheduler, train_model)
        print0(f"resumed from {resume_from} at step {step}/{total_steps}" +
               (f"; changed since the checkpoint: {', '.join(changed)}" if changed else ""))
    with rank_0_errors(device):
        if rank == 0:  # the first write into the output directory: every input has been checked by now
            claim_output_dir(out, replace_previous_run=cfg.overwrite_output_dir and not cfg.resume,
                             resume_step=step if resume_from is not None else None)
            with disk_errors(out / "train_config.json"):
                write_json_atomic(out / "train_config.json", asdict(cfg))
    wandb_run = init_wandb(cfg.use_wandb, cfg.wandb_project, asdict(cfg))  # a do-nothing stand-in if off

    def save(step: int) -> Path:
        # No history in a checkpoint: it lives in log.jsonl, so a checkpoint's size does not grow with the step.
        trainer_state = {"step": step, "best_accuracy": best_accuracy, "config": asdict(cfg),
                         "total_steps": total_steps, "step_batch": step_batch, "world_size": world,
                         "data": data_read}
        return save_training_state(out, step, model, train_model, optimizer, scheduler, trainer_state, cfg, device)

    collate = choose_collate(cfg.packing, cfg.share_prompt)  # padded, packed and/or shared-prompt batches
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    since_last_log = MetricsSinceLastLog()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stop = SignalStop()  # Ctrl-C / SIGTERM: finish the step, checkpoint, print a resume line
    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and rank == 0))
    try:
        with stop, bar:
            while step < total_steps:
                # -- one optimizer step over gradient_accumulation_steps micro-batches
                micro_batches = batches.micro_batches(step, cfg.batch_size, rank, world)
                pairs_in_step = sum(n for _, n in micro_batches)  # over all micro-batches and processes
                metrics = torch.zeros(4, device=device)  # loss, accuracy, margin (pair-weighted), tokens
                for i, (idx, _) in enumerate(micro_batches):
                    # Weight each micro-batch by its share of the step's pairs, so accumulation (and data
                    # parallelism, which averages over processes) equals one big batch exactly. A process
                    # whose slice of a short last batch is empty still runs (on a stand-in pair, weight 0),
                    # because every process must join each gradient all-reduce.
                    weight = len(idx) / pairs_in_step * world
                    items = [train_items[j] for j in idx] or [train_items[0]]
                    batch = collate(items, model.tokenizer.pad_id).to(device)
                    with no_sync(train_model, sync=i == len(micro_batches) - 1), autocast:
                        rewards = train_model(batch.input_ids, batch.attention_mask, batch.layout)
                    chosen, rejected = rewards.chunk(2)  # rows 0..B-1 are the chosen responses
                    pairwise = pairwise_loss(chosen, rejected, batch.margin, cfg.center_rewards_coefficient)
                    (pairwise["loss"] * weight).backward()
                    metrics += torch.stack([pairwise["loss"].detach() * weight, pairwise["accuracy"] * weight,
                                            pairwise["margin"].detach() * weight,
                                            batch.num_tokens() * world * (len(idx) > 0)])
                metrics = all_reduce_mean(metrics, world)
                loss = metrics[0].item()
                stop_if_not_finite("loss", loss, step + 1, out)
                grad_norm = clip_grad_norm(train_model, cfg.max_grad_norm)
                # a finite loss can still have an overflowing gradient
                stop_if_not_finite("gradient norm", float(grad_norm), step + 1, out, before_update=True)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged, as TRL does)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                since_last_log.add(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{metrics[1].item():.3f}")

                # -- log, evaluate (keeping the best model), checkpoint, stop on a signal
                if step % cfg.logging_steps == 0 or step == total_steps:
                    log_record(out, since_last_log.record(step, step / batches.steps_per_epoch, lr, grad_norm,
                                                          device), wandb_run)
                if held_out.items and (step % cfg.eval_steps == 0 or step == total_steps):
                    best_accuracy, last_report = evaluate_and_keep_best(model, train_model, held_out, step,
                                                                        best_accuracy, cfg, out, device, wandb_run)
                saved = step % cfg.save_steps == 0 and step < total_steps
                if saved:
                    save(step)
                if stop.requested(world, device) and step < total_steps:
                    path = out / f"checkpoint_step_{step}" if saved else save(step)  # not the same one twice
                    print0(stopped_message(stop.signal, path, step, total_steps))
                    return {"stopped_at": step, "checkpoint": str(path), "signal": stop.signal}
        final_report = last_report if step == total_steps else None  # scored at the last step: not again
        return finish_run(model, train_model, held_out, cfg, out, step, world, wandb_run, final_report)
    except ForcedStop:  # a second Ctrl-C: out at once, saying which checkpoint is intact
        raise forced_stop(out, step, total_steps, stop.signal) from None
    finally:
        release_output_dir(out)  # the next run may take the directory (rank 0 holds it from the claim)


# ----------------------------------------------------------------------------------------------
# Checking the configuration (a mistake found here ends the run before anything is written), then
# building the pieces: the model, the data and its order, the optimizer and the schedule


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
    if cfg.from_scratch and cfg.model not in MODEL_SHAPES:
        raise UserError(f"--from_scratch needs --model to name one of {sorted(MODEL_SHAPES)}")
    if cfg.model_8bit and cfg.fsdp:
        raise UserError("--8bit_model cannot be combined with --fsdp (int8 weights cannot be sharded); drop one")
    if cfg.lora_rank is None:
        given = [f"--{k}" for k, v in (("lora_alpha", cfg.lora_alpha), ("lora_dropout", cfg.lora_dropout),
                                       ("lora_targets", cfg.lora_targets), ("save_adapters", cfg.save_adapters))
                 if v != TrainConfig.__dataclass_fields__[k].default]
        if given:
            raise UserError(f"{', '.join(given)} without --lora_rank: these configure LoRA; add --lora_rank R "
                            "(e.g. 16) or drop them")
    else:
        check_options(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        if cfg.fsdp:  # FSDP shards what trains and its Adam state; under LoRA that is a few MB
            raise UserError("--lora_rank cannot be combined with --fsdp: LoRA trains a few MB, so there is nothing "
                            "worth sharding, and the frozen base fits each GPU (bf16 or --8bit_model); use DDP")
    if cfg.resume and cfg.overwrite_output_dir:
        raise UserError("--resume and --overwrite_output_dir contradict each other; pick one")
    if cfg.eval_fraction is not None:
        if not 0 < cfg.eval_fraction < 1:
            raise UserError(f"--eval_fraction must be between 0 and 1 (got {cfg.eval_fraction}), e.g. 0.05")
        if cfg.eval_dataset or cfg.eval_split == "none":
            raise UserError("--eval_fraction holds out a share of the training pairs: it contradicts "
                            f"{'--eval_dataset' if cfg.eval_dataset else '--eval_split none'}; pick one")
    check_output_dir_apart(cfg)
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"--seed must be an integer from 0 to 2**63 - 1 (got {cfg.seed})")
    device = check_device(cfg.device)
    if cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--bf16 needs a GPU with bfloat16 support ({torch.cuda.get_device_name()} has none); "
                        "drop --bf16")
    if cfg.optim_8bit or cfg.model_8bit:
        hub.import_bitsandbytes()  # quietly, and without the Hub
    if cfg.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--use_wandb needs the wandb package: pip install wandb (or drop --use_wandb)") from None
    return device


def check_device(name: str | None) -> torch.device:
    """--device: cpu, cuda[:N] or mps, and one this machine has (default: cuda if available)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be cpu, cuda, cuda:N or mps (got {name!r})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this PyTorch build or machine has no MPS; use --device cpu")
    return device


def check_output_dir_apart(cfg: TrainConfig):
    """The run writes JSON files and model directories into --output_dir. Inside a dataset directory they
    would be read as data (splits named train_config, ...) by every later run; in the --model directory,
    eval.py would find the base model's config.json first, score it and replace the run's report."""
    out = Path(cfg.output_dir).expanduser().resolve()
    for source in [*cfg.dataset, *(cfg.eval_dataset or [])]:
        if source == "demo" or not hub.is_local_source(source):
            continue
        parts = Path(source).expanduser().parts  # a glob reads from the directory before its first pattern
        magic = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
        directory = Path(*parts[:magic] or ["."]) if magic is not None else Path(source).expanduser()
        # a directory is read recursively; a glob below its directory if a pattern is not the last part, or **
        below = magic is None or magic < len(parts) - 1 or "**" in source
        if directory.is_dir() and (out == directory.resolve() or below and directory.resolve() in out.parents):
            raise UserError(f"--output_dir {cfg.output_dir} is inside the dataset directory {directory}: the run's "
                            "files would be read as data; choose an --output_dir outside it")
    if not cfg.from_scratch and Path(cfg.model).expanduser().is_dir() and \
            Path(cfg.model).expanduser().resolve() == out:
        raise UserError(f"--output_dir {cfg.output_dir} is the --model directory: the run would mix its files "
                        "with the base model's (eval.py there would score the base model); choose another "
                        "--output_dir")


def build_model(cfg: TrainConfig) -> RewardModel:
    """From scratch (the demo: a qwen3.SHAPES shape, the demo tokenizer's vocabulary), or a checkpoint."""
    if cfg.from_scratch:
        from support.demo import demo_tokenizer
        tokenizer = demo_tokenizer()
        config = dataclasses.replace(MODEL_SHAPES[cfg.model], vocab_size=tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        model = RewardModel(config, head=cfg.head or "mlp", pooling=cfg.pooling or "mean")
        model.model.init_weights(seed=cfg.seed)
        model.init_head(cfg.seed)
        model.tokenizer = tokenizer
        return model
    model = RewardModel.from_pretrained(cfg.model, head=cfg.head, pooling=cfg.pooling, seed=cfg.seed)
    if model.tokenizer is None:
        raise UserError(f"{cfg.model} has no tokenizer.json; a model directory must hold its tokenizer files")
    return model


class HeldOut(NamedTuple):
    """The held-out pairs, tokenised once, and what loading them skipped (it shows in the report)."""
    items: list
    stats: data.DataStats
    sources: list


# The share of the training pairs held out when the evaluation data would be the training files.
DEFAULT_EVAL_FRACTION = 0.05


def eval_plan(cfg: TrainConfig) -> tuple[list, float | None]:
    """Where the held-out pairs come from: (sources, fraction). With a fraction, they are that share of the
    training pairs (data.split_held_out). That is the default when --eval_dataset/--eval_split resolve to
    the very files training reads (a local file has no splits): a pair evaluated is never one trained on."""
    if cfg.eval_fraction is not None:
        return list(cfg.dataset), cfg.eval_fraction
    sources = list(cfg.eval_dataset or cfg.dataset)
    train_files = set().union(*(readers.source_files(s, "train") for s in cfg.dataset))
    eval_files = set().union(*(readers.source_files(s, cfg.eval_split) for s in sources))
    if eval_files == train_files:
        return list(cfg.dataset), DEFAULT_EVAL_FRACTION
    if eval_files & train_files:
        raise UserError(f"the evaluation data ({', '.join(sources)}, split {cfg.eval_split}) includes training "
                        f"files ({', '.join(sorted(eval_files & train_files)[:3])}), so its accuracy would not be "
                        "held out; pass held-out files with --eval_dataset, hold out a share of the training "
                        "pairs with --eval_fraction 0.05, or turn evaluation off with --eval_split none")
    return sources, None


def load_pairs_and_held_out(cfg: TrainConfig, train_stats: data.DataStats, eval_stats: data.DataStats,
                            chat_format=None) -> tuple[list, list, list]:
    """(training pairs, held-out pairs, held-out sources). A held-out share (eval_plan) is recorded in cfg,
    as is the split it comes from: train_config.json and the checkpoints say what the run evaluates on."""
    def load(*args, **kwargs):  # conversational rows are rendered with chat_format
        return data.load_pairs(*args, chat_format=chat_format, **kwargs)
    if cfg.eval_split == "none":
        return load(cfg.dataset, "train", cfg.max_train_samples, train_stats), [], []
    sources, fraction = eval_plan(cfg)
    if fraction is None:
        return (load(cfg.dataset, "train", cfg.max_train_samples, train_stats),
                load(sources, cfg.eval_split, cfg.max_eval_samples, eval_stats), sources)
    cfg.eval_fraction, cfg.eval_split = fraction, "train"
    # Every pair is read, then split by content: the held-out pairs do not depend on the sample limits.
    train_pairs, held = data.split_held_out(load(cfg.dataset, "train", stats=train_stats), fraction)
    held = held[:cfg.max_eval_samples]  # either side may be empty: load_data says so, after the length check
    return train_pairs[:cfg.max_train_samples], held, sources


def load_data(cfg: TrainConfig, tokenizer) -> tuple[list, HeldOut, dict]:
    """Pairs -> token ids, for training and held out; every skipped or dropped pair is counted and reported.
    Also returns what was read (pairs and files), for a resume to notice data that changed."""
    train_stats, eval_stats = data.DataStats(), data.DataStats()
    chat_format = tokenizer.chat_format(cfg.chat_template)  # renders conversational rows
    train_pairs, eval_pairs, eval_sources = load_pairs_and_held_out(cfg, train_stats, eval_stats, chat_format)
    if cfg.eval_fraction:  # taken out of the training pairs: their reading counts as training's
        eval_stats = data.DataStats.of_pairs(eval_pairs)
    evaluating = cfg.eval_split != "none"
    train_items = data.tokenize_pairs(train_pairs, tokenizer, cfg.max_length, train_stats)
    # Tokenised once, here: a held-out set that cannot be evaluated fails now, not at the first evaluation.
    eval_items = data.tokenize_pairs(eval_pairs, tokenizer, cfg.max_length, eval_stats) if evaluating else []
    for items, pairs, split, sources in ((train_items, train_pairs, "train", cfg.dataset),
                                         (eval_items, eval_pairs, cfg.eval_split, eval_sources)):
        if not pairs and cfg.eval_fraction:  # the held-out share took every pair, or none
            raise UserError(f"--eval_fraction {cfg.eval_fraction} holds out {len(eval_pairs)} of the "
                            f"{len(train_pairs) + len(eval_pairs)} pairs of {', '.join(cfg.dataset)}, leaving "
                            f"nothing to {'train on' if eval_pairs else 'evaluate'}; pass held-out files with "
                            "--eval_dataset, another --eval_fraction, or --eval_split none")
        if not items and (split == "train" or evaluating):
            raise UserError(f"all {len(pairs)} '{split}' pairs of {', '.join(sources)} are longer than "
                            f"--max_length {cfg.max_length} tokens (a response and its eos must fit); "
                            "raise --max_length")
    held = f" (held out of the training pairs by content hash: --eval_fraction {cfg.eval_fraction})" \
        if cfg.eval_fraction else ""
    print0(f"data: {len(train_items)} training pairs, {len(eval_items)} eval pairs{held} | "
           f"train {train_stats.report()} | eval {eval_stats.report()}")
    read = {"train_pairs": len(train_pairs), "train_digest": data.pairs_digest(train_pairs),
            "files": {**readers.file_fingerprints(cfg.dataset, "train"),
                      **(readers.file_fingerprints(eval_sources, cfg.eval_split) if evaluating else {})}}
    return train_items, HeldOut(eval_items, eval_stats, eval_sources), read


class StepBatches:
    """Which pairs each optimizer step trains on. One step consumes one "step batch" of batch_size x
    accumulation x processes pairs, and the order of step batches depends only on the seed and the epoch:
    1 process x batch 8, 2 processes x batch 4 and batch 4 x 2 accumulation steps all see exactly the same
    pairs at every step, and a resumed run picks the data order up at its step."""
    def __init__(self, items: list, step_batch: int, seed: int):
        self.lengths = [len(it.chosen_ids) + len(it.rejected_ids) for it in items]
        self.step_batch, self.seed = step_batch, seed
        self.steps_per_epoch = math.ceil(len(items) / step_batch)
        self.epoch, self.order = None, None

    def micro_batches(self, step: int, batch_size: int, rank: int, world: int) -> list[tuple[list[int], int]]:
        """This process's micro-batches of optimizer step `step` (indices into the items), each with the
        number of pairs in the whole micro-step (all processes)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, data.batch_order(self.lengths, self.step_batch, self.seed, epoch)
        idx = self.order[j]
        per_micro = batch_size * world
        chunks = [idx[i:i + per_micro] for i in range(0, len(idx), per_micro)]
        return [(chunk[rank::world], len(chunk)) for chunk in chunks]


def prepare_model(model: RewardModel, cfg: TrainConfig, device, world: int, resume_from: Path | None):
    """The model as it trains: resumed weights, on the device, int8, LoRA adapters, frozen layers,
    recomputed activations, compiled blocks; returned wrapped for DDP/FSDP under torchrun (`model`
    itself stays the one to save)."""
    if cfg.lora_rank is not None:  # the base as loaded, before int8 or bf16 change it: what adapters need
        fingerprint = base_fingerprint(model)
    if resume_from is not None:  # weights first, then the options that change the modules
        adapters = resume_weights(model, cfg, resume_from, fingerprint if cfg.lora_rank is not None else None)
    model.to(device)
    if device.type == "cpu":
        use_one_thread_if_tiny(model)
    if cfg.model_8bit:  # after the move: bitsandbytes quantises while placing the weights on the device
        model.quantize_8bit()
    if cfg.lora_rank is not None:  # frozen fp32 / bf16 (--bf16) / int8 (--8bit_model) base, adapters on top
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed,
                 base_dtype=torch.bfloat16 if cfg.bf16 else None)
        model.lora_config.update(base_model=cfg.model, base_fingerprint=fingerprint, base_8bit=cfg.model_8bit)
        if resume_from is not None:
            load_adapter_state_dict(model, adapters, where=str(resume_from / "adapters"))
    model.freeze_layers(cfg.freeze_layers)
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    train_model = wrap(model, cfg.fsdp, device, world)
    if cfg.compile:  # each block compiled in place: one compilation for all of them (see Qwen3.compile_blocks)
        model.model.compile_blocks()
    return train_model


TINY_MODEL_PARAMS = 2_000_000  # non-embedding parameters; the demo has 0.1M, the "small" config 25M


def use_one_thread_if_tiny(model: RewardModel):
    """Run a tiny model (the demo) on one CPU thread. Its matrices are too small to split between threads,
    so a second thread mostly waits; with another busy process on the machine, that waiting made the demo
    several times slower (BENCHMARKS.md, "The demo on a busy machine"). OMP_NUM_THREADS, if set, wins."""
    if "OMP_NUM_THREADS" not in os.environ and model.model.num_params() < TINY_MODEL_PARAMS:
        torch.set_num_threads(1)


def resume_weights(model: RewardModel, cfg: TrainConfig, path: Path, fingerprint: str | None):
    """A full checkpoint's weights go into `model`; a LoRA checkpoint's adapters are returned, to load once
    add_lora has made their places, after checking they belong to this base model."""
    if (path / "adapters").is_dir() != (cfg.lora_rank is not None):
        raise UserError(f"--resume: {path} was trained with{'' if (path / 'adapters').is_dir() else 'out'} "
                        f"LoRA; resume with the same --lora_* flags it was trained with")
    if cfg.lora_rank is not None:
        config, adapters = read_adapters(path / "adapters")
        check_base(config, fingerprint, path)
        return adapters
    weights.load_weights(model, path / "model", torch.float32, export.module_name)
    return None


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


def check_resume(path: Path, cfg: TrainConfig, step_batch: int, total_steps: int, data_read: dict):
    """Refuse a resume that would not continue the run of the checkpoint at `path` (checkpoint.SAME_RUN,
    the pairs per step, the training pairs read), or that has no step left to train."""
    state = read_trainer_state(path)
    check_same_run(state, cfg, step_batch)
    check_same_data(state.get("data"), data_read)
    if total_steps <= state["step"]:
        raise UserError(f"--resume: the checkpoint is at step {state['step']} and this run ends at step "
                        f"{total_steps} (--max_steps/--num_epochs); ask for more steps, or use its model as it is")


def resume_training(path: Path, cfg: TrainConfig, optimizer, scheduler, train_model):
    """Continue the run where the checkpoint at `path` left it: optimizer, schedule and RNG states. What may
    change on a resume (checkpoint.MAY_CHANGE) takes effect from here: the peak learning rate and the weight
    decay replace the saved ones, and the learning rate follows this run's schedule (a changed
    --learning_rate, --max_steps, --num_epochs or --warmup_ratio), from the first resumed step on.
    Returns (step, best held-out accuracy so far, the changes as "name old -> new")."""
    state = read_trainer_state(path)
    restore_training_state(path, optimizer, scheduler,
                           lambda saved: load_optimizer_state(optimizer, train_model, saved, cfg.fsdp))
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    for group, base_lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base_lr, base_lr * f(scheduler.last_epoch)  # as LambdaLR computes it
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # matrices; norms and biases stay at 0
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    changed = [f"{k} {state['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in MAY_CHANGE
               if k not in ("resume", "output_dir") and state["config"].get(k) != getattr(cfg, k)]
    return state["step"], state["best_accuracy"], changed


# ----------------------------------------------------------------------------------------------
# What the loop calls: the step's checks, logging, evaluation, checkpoints, the end of the run


def stop_if_not_finite(what: str, value: float, step: int, out: Path, before_update: bool = False):
    """A NaN or inf ends the run with one line naming the step and the last good checkpoint."""
    if not math.isfinite(value):
        last = checkpoint_dirs(out)
        when = " before the update." if before_update else "."
        advice = (f"Last good checkpoint: {last[-1]}. Resume from it with a lower learning rate (the same flags "
                  f"and --resume {last[-1]} --learning_rate LOWER: it applies from there on), or check the data"
                  if last else "Last good checkpoint: none. Start again with a lower --learning_rate and "
                               "--overwrite_output_dir, or check the data")
        raise UserError(f"the {what} became {value} at step {step}; training stopped{when} {advice}")


def clip_grad_norm(model, max_norm: float):
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class MetricsSinceLastLog:
    """The training metrics of the steps since the last log line, averaged into the next one."""
    def __init__(self):
        self.reset()

    def reset(self):
        self.loss = self.accuracy = self.margin = 0.0
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()

    def add(self, metrics: torch.Tensor):
        """One step's (loss, accuracy, margin, tokens), the tokens summed over processes."""
        loss, accuracy, margin, tokens = metrics.tolist()
        self.loss, self.accuracy, self.margin = self.loss + loss, self.accuracy + accuracy, self.margin + margin
        self.steps += 1
        self.tokens += int(tokens)

    def record(self, step: int, epoch: float, lr: float, grad_norm, device) -> dict:
        """The log.jsonl record of these steps; the next one starts from here."""
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "epoch": round(epoch, 3), "loss": significant(self.loss / self.steps),
                  "accuracy": round(self.accuracy / self.steps, 5), "margin": significant(self.margin / self.steps),
                  "lr": lr, "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(self.tokens / elapsed, 1),
                  "peak_mem_gib": round(peak_memory_gib(device), 3)}
        self.reset()
        return record


def significant(x: float, digits: int = 6) -> float:
    """x to `digits` significant digits: a loss of 1.16e-5 stays 1.16e-5 (round(x, 5) would log 1e-5)."""
    return float(f"{x:.{digits}g}")


def peak_memory_gib(device) -> float:
    """CUDA: the peak of allocated tensors. CPU: the process's peak RSS, VmHWM (Linux), which follows a
    reset through /proc/self/clear_refs (bench.py measures each side that way), unlike ru_maxrss."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # also KiB on Linux


def log_record(out: Path, record: dict, wandb_run, line: str | None = None):
    """A record to log.jsonl and W&B, and a line to the console (rank 0 only)."""
    if is_main_process():
        with disk_errors(out / "log.jsonl"):
            append_log(out, record)
    wandb_run.log(record, step=record["step"])
    print0(line or " | ".join(f"{k} {v}" for k, v in record.items()))


def evaluate_and_keep_best(model, train_model, held_out: HeldOut, step: int, best_accuracy: float,
                           cfg: TrainConfig, out: Path, device, wandb_run) -> tuple[float, dict | None]:
    """Evaluate on the held-out pairs (rank 0; under FSDP every process gathers the weights first), log it,
    and keep the best model so far as best_model_step_N/. Returns the best accuracy so far and the report
    (None on other ranks)."""
    from eval import evaluate
    full, report = gather_model_state(train_model, cfg.fsdp), None
    with rank_0_errors(device):  # e.g. a full disk while saving the best model ends every process
        if is_main_process():
            current = unsharded(model, full)
            report = evaluate(current, held_out.items, batch_size=cfg.batch_size * 2, max_length=cfg.max_length,
                              bf16=cfg.bf16, progress=False, stats=held_out.stats, share_prompt=cfg.share_prompt)
            record = {"step": step, "eval_accuracy": report["accuracy"], "eval_loss": report["loss"],
                      "eval_margin": report["margin"]["mean"]}
            log_record(out, record, wandb_run, f"eval step {step}: accuracy {record['eval_accuracy']:.4f} | "
                                               f"loss {record['eval_loss']:.4f} | margin {record['eval_margin']:.4f}")
            if record["eval_accuracy"] > best_accuracy:
                best_accuracy = record["eval_accuracy"]
                best = out / f"best_model_step_{step}"
                with disk_errors(best):  # the new best first, then the old one goes: never none
                    current.save_pretrained(best)
                    for old in out.glob("best_model_step_*"):
                        if old.name != best.name:
                            remove(old)
    return best_accuracy, report


def save_training_state(out: Path, step: int, model, train_model, optimizer, scheduler, trainer_state: dict,
                        cfg: TrainConfig, device) -> Path:
    """checkpoint_step_N/: every process gathers its shards (under FSDP), rank 0 writes."""
    full = gather_model_state(train_model, cfg.fsdp)
    optimizer_state = gather_optimizer_state(optimizer, train_model, cfg.fsdp)
    with rank_0_errors(device):  # e.g. a full disk on rank 0 ends every process
        if is_main_process():
            save_checkpoint(out, step, unsharded(model, full), optimizer_state, scheduler, trainer_state,
                            cfg.save_total_limit)
    return out / f"checkpoint_step_{step}"


def finish_run(model, train_model, held_out: HeldOut, cfg: TrainConfig, out: Path, step: int, world: int,
               wandb_run, report: dict | None = None) -> dict:
    """The final model and its evaluation report (rank 0; `report` when the last step was just evaluated,
    the same weights), then every process leaves together."""
    from eval import evaluate
    result = {"step": step, "output_dir": str(out), "final_model": str(out / "final_model")}
    full = gather_model_state(train_model, cfg.fsdp)
    if is_main_process():
        final_model = unsharded(model, full)
        with disk_errors(out / "final_model"):
            final_model.save_pretrained(out / "final_model")  # LoRA: merged into plain weights
        if cfg.save_adapters:
            with disk_errors(out / "final_adapters"):
                save_adapters(model, out / "final_adapters")
        if held_out.items:
            if report is None:
                report = evaluate(final_model, held_out.items, batch_size=cfg.batch_size * 2,
                                  max_length=cfg.max_length, bf16=cfg.bf16, progress=cfg.progress,
                                  stats=held_out.stats, share_prompt=cfg.share_prompt)
            report.update(checkpoint=str(out / "final_model"), dataset=held_out.sources, split=cfg.eval_split,
                          eval_fraction=cfg.eval_fraction, max_length=cfg.max_length,
                          max_samples=cfg.max_eval_samples)
            with disk_errors(out / "evaluation_report.json"):  # reward mean/std for normalize=True
                report["reward_stats"] = scoring.save_reward_stats(out / "final_model", report)
                write_json_atomic(out / "evaluation_report.json", report)
            result.update(eval_accuracy=report["accuracy"], report=str(out / "evaluation_report.json"))
            print0(f"final: eval accuracy {report['accuracy']:.4f} on {report['num_pairs']} pairs | "
                   f"model saved to {out / 'final_model'}")
        else:
            print0(f"final: model saved to {out / 'final_model'} (no evaluation: --eval_split none)")
    wandb_run.finish()
    # Not under rank_0_errors: one more collective right before destroy_process_group let gloo abort at exit
    # now and then (1 run in 18 under load); a failure here ends rank 0, and torchrun then stops the others.
    end_distributed(world)
    result["history"] = read_log(out) if is_main_process() else []  # the whole run's, resumed parts included
    return result


# ----------------------------------------------------------------------------------------------
# Command line: argparse builds a TrainConfig; the named config supplies defaults, flags override.

# The default of every flag that a named config can set: a flag not given stays out of the parsed
# arguments, so the named config's value applies.
UNSET = argparse.SUPPRESS


def parse_args(argv=None) -> TrainConfig:
    p = ArgumentParser(prog="train.py", description="Train a Qwen3 reward model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="custom", choices=sorted(CONFIGS), help="named configuration to start from")
    p.add_argument("--model", "--model_name", dest="model", default=UNSET,
                   help="Hub repo id or local checkpoint directory")
    p.add_argument("--from_scratch", action="store_true", default=UNSET,
                   help="random init of a qwen3.SHAPES shape (tiny, 0.6b, 1.7b) with the demo's tokenizer: "
                        "for the demo and tests")
    p.add_argument("--head", default=UNSET, choices=HEADS, help="reward head (default: the checkpoint's, else mlp)")
    p.add_argument("--pooling", default=UNSET, choices=POOLINGS, help="pooling (default: the checkpoint's, else mean)")
    p.add_argument("--dataset", nargs="+", default=UNSET,
                   help="one or more sources: Hub dataset ids, files, dirs, globs, 'demo'")
    p.add_argument("--eval_split", default=UNSET, help="held-out split for evaluation; 'none' turns evaluation off")
    p.add_argument("--eval_dataset", nargs="+", default=UNSET,
                   help="held-out sources (default: --dataset at --eval_split)")
    p.add_argument("--eval_fraction", type=float, default=UNSET,
                   help="evaluate on this share of the training pairs, held out by a hash of each pair's text "
                        f"(none of them trained on); {DEFAULT_EVAL_FRACTION} when the evaluation data would be "
                        "the training files (a local file has no splits)")
    p.add_argument("--max_train_samples", type=int, default=UNSET, help="use at most this many training pairs")
    p.add_argument("--max_eval_samples", type=int, default=UNSET, help="evaluate on at most this many pairs")
    p.add_argument("--max_length", type=int, default=UNSET, help="max tokens per sequence (prompt cut from the left)")
    p.add_argument("--chat_template", default=UNSET, metavar="auto|none|PATH",
                   help="conversational rows (lists of messages): auto renders them with the model's chat "
                        "template, PATH with that .jinja file (saved with the model), none refuses them")
    p.add_argument("--batch_size", type=int, default=UNSET, help="pairs per micro-batch per process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=UNSET, help="micro-batches per optimizer step")
    p.add_argument("--learning_rate", type=float, default=UNSET, help="peak learning rate")
    p.add_argument("--num_epochs", type=float, default=UNSET, help="passes over the training pairs")
    p.add_argument("--max_steps", type=int, default=UNSET, help="optimizer steps; > 0 overrides --num_epochs")
    p.add_argument("--warmup_ratio", type=float, default=UNSET, help="share of steps with linear warmup")
    p.add_argument("--weight_decay", type=float, default=UNSET, help="AdamW weight decay (matrices only)")
    p.add_argument("--max_grad_norm", type=float, default=UNSET, help="gradient clipping (0 = off)")
    p.add_argument("--center_rewards_coefficient", type=float, default=UNSET, help="weight of mean((r_c + r_r)^2)")
    p.add_argument("--freeze_layers", type=int, default=UNSET, help="freeze the embeddings and the first N blocks")
    p.add_argument("--bf16", action="store_true", default=UNSET, help="bf16 autocast over fp32 master weights")
    p.add_argument("--gradient_checkpointing", action="store_true", default=UNSET,
                   help="recompute activations in backward")
    p.add_argument("--8bit_optim", dest="optim_8bit", action="store_true", default=UNSET, help="bitsandbytes AdamW8bit")
    p.add_argument("--8bit_model", dest="model_8bit", action="store_true", default=UNSET,
                   help="frozen int8 backbone (bitsandbytes Linear8bitLt); trains the head and norms")
    p.add_argument("--compile", action="store_true", default=UNSET,
                   help="torch.compile each transformer block (Qwen3.compile_blocks)")
    p.add_argument("--packing", action="store_true", default=UNSET,
                   help="padding-free batches: all sequences of a micro-batch in one row (packing.collate_packed)")
    p.add_argument("--share_prompt", action="store_true", default=UNSET,
                   help="each pair's prompt goes through the model once, not twice, and no padding does (same "
                        "results); attention runs on padded rows, or with --packing on packed ones")
    p.add_argument("--fsdp", action="store_true", default=UNSET, help="under torchrun: FSDP2 instead of DDP")
    p.add_argument("--lora_rank", type=int, default=UNSET,
                   help="train rank-R LoRA adapters on a frozen backbone (and the head); saved merged")
    p.add_argument("--lora_alpha", type=float, default=UNSET, help="LoRA scale alpha/R (default: 2R)")
    p.add_argument("--lora_dropout", type=float, default=UNSET, help="dropout on the adapters' input")
    p.add_argument("--lora_targets", default=UNSET, help="comma-separated layers to adapt, from q,k,v,o,gate,up,down")
    p.add_argument("--save_adapters", action="store_true", default=UNSET,
                   help="with --lora_rank: also write final_adapters/ (adapters and head alone, small)")
    p.add_argument("--eval_steps", type=int, default=UNSET, help="evaluate every N steps")
    p.add_argument("--save_steps", type=int, default=UNSET, help="checkpoint every N steps")
    p.add_argument("--save_total_limit", type=int, default=UNSET, help="keep the newest N checkpoints")
    p.add_argument("--logging_steps", type=int, default=UNSET, help="log every N steps")
    p.add_argument("--output_dir", default=UNSET, help="where checkpoints and the final model go")
    p.add_argument("--overwrite_output_dir", action="store_true", default=UNSET, help="replace a previous run there")
    p.add_argument("--resume", nargs="?", const="latest", default=UNSET,
                   help="continue from the latest checkpoint in --output_dir (--resume alone, or --resume "
                        "latest), or from the given checkpoint directory. Refused if these differ from the "
                        "checkpoint's: " + ", ".join(SAME_RUN) + ", or the pairs per step, or the training "
                        "pairs read. Any other flag may change and applies from the resumed step on (a new "
                        "--learning_rate or --max_steps: this run's schedule)")
    p.add_argument("--seed", type=int, default=UNSET, help="random seed (init, data order)")
    p.add_argument("--device", default=UNSET, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--use_wandb", action="store_true", default=UNSET, help="log to Weights & Biases")
    p.add_argument("--wandb_project", default=UNSET, help="W&B project name")
    p.add_argument("--no_progress", dest="progress", action="store_false", default=UNSET, help="no progress bar")
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
        eval_args = [model_path, "--batch_size", str(cfg.batch_size * 2)]
        if cfg.eval_split == "none":
            raise UserError("--eval_only with --eval_split none evaluates nothing; pass a split such as test")
        if "eval_split" in given:  # else eval.py's default: the held-out pairs the model was trained with
            eval_args += ["--split", cfg.eval_split]
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
        if not cfg.progress:
            eval_args.append("--no_progress")
        eval_args += ["--chat_template", cfg.chat_template]
        return eval_cli.main(eval_args)
    try:
        result = train(cfg)
    except ForcedStop as e:  # like the first Ctrl-C: exit status 130, not 0
        if str(e):
            print(e, file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    # Stopped by a signal, checkpoint saved: not a finished run (`train.py && eval.py` must not go on).
    if "stopped_at" in result:
        sys.exit(128 + signal.Signals[result["signal"]].value)


if __name__ == "__main__":
    run_cli(main)
