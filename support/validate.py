"""Checking a training configuration before anything is loaded or written: a mistake found here ends the run
in one line (UserError) with nothing written.

- validate(cfg): every setting of train.TrainConfig in range, no contradicting flags, the optional packages
  a flag needs installed; returns the device to train on.
- check_device: --device is cpu, cuda[:N] or mps, and one this machine has.
- check_output_dir_apart: --output_dir is neither inside a dataset directory nor the --model directory.
- check_pairs_left: after loading, pairs left to train on and to evaluate on.
- check_eval_args: eval.py's flags, checked before any loading; trained_settings: eval.py's CHECKPOINT is
  a reward model (a plain language model's head would be random), and what it was trained with.
- check_paths: the paths given on a command line can exist (no name over NAME_MAX bytes: the OSError came
  mid-run), and those the `tokenizers`/`safetensors` libraries write are valid UTF-8.

The reward heads and poolings (rm.py) and the named model shapes (qwen3.SHAPES) are the lesson's; they are
imported from there.
"""
import dataclasses
import math
import os
from pathlib import Path

import torch

from qwen3 import SHAPES as MODEL_SHAPES
from rm import HEADS, POOLINGS
from support import export, hub, lora, metrics
from support import report as report_files
from support.errors import UserError

NAME_MAX, PATH_MAX = 255, 4096  # bytes in one file or directory name, in a whole path (Linux, macOS: 255, 1024)


def validate(cfg) -> torch.device:
    """Refuse a configuration that cannot run, in one line; the device to train on."""
    check_paths({"--output_dir": cfg.output_dir, "--model": cfg.model, "--dataset": cfg.dataset,
                 "--eval_dataset": cfg.eval_dataset, "--resume": cfg.resume, "--chat_template": cfg.chat_template},
                utf8={"--output_dir"})  # first: every check below looks at the disk
    # Comparisons are written so that NaN fails them too (NaN > 0 is False), and inf is refused.
    for name in ("batch_size", "gradient_accumulation_steps", "max_length", "eval_steps", "save_steps",
                 "logging_steps", "save_total_limit"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be a positive integer (got {getattr(cfg, name)})")
    if not 0 < cfg.learning_rate < math.inf:
        raise UserError(f"--learning_rate must be positive and finite (got {cfg.learning_rate}); "
                        "e.g. 5e-6 for Qwen3-0.6B")
    if cfg.max_steps == 0 or cfg.max_steps < -1:  # 0 ran the whole --num_epochs schedule, as -1 (unset) does
        raise UserError(f"--max_steps must be a positive integer, or -1 to train --num_epochs (got {cfg.max_steps})")
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
    if cfg.loss != "pairwise" and cfg.center_rewards_coefficient:
        raise UserError(f"--center_rewards_coefficient applies to --loss pairwise (it centres r_chosen + r_rejected); "
                        f"drop it with --loss {cfg.loss}")
    if cfg.pairs_from_ranked and cfg.loss != "pairwise":
        raise UserError(f"--pairs_from_ranked binarises ranked rows for --loss pairwise, but --loss {cfg.loss} trains "
                        "on whole groups; drop one")
    if cfg.head not in (None, *HEADS):
        raise UserError(f"--head must be one of {HEADS} (got {cfg.head!r})")
    if cfg.pooling not in (None, *POOLINGS):
        raise UserError(f"--pooling must be one of {POOLINGS} (got {cfg.pooling!r})")
    if cfg.from_scratch and cfg.model not in MODEL_SHAPES:
        raise UserError(f"--from_scratch needs --model to name one of {sorted(MODEL_SHAPES)}")
    for path in cfg.decontaminate or []:  # read after the model loads: a wrong path fails now, not then
        if not Path(path).expanduser().exists():
            raise UserError(f"--decontaminate {path}: no such file or directory; give local RewardBench, RewardBench 2 "
                            "or RM-Bench files (docs/benchmarks.md says where to get them)")
    if cfg.model_8bit and cfg.fsdp:
        raise UserError("--8bit_model cannot be combined with --fsdp (int8 weights cannot be sharded); drop one")
    if cfg.lora_rank is None:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        given = [f"--{k}" for k, v in (("lora_alpha", cfg.lora_alpha), ("lora_dropout", cfg.lora_dropout),
                                       ("lora_targets", cfg.lora_targets), ("save_adapters", cfg.save_adapters))
                 if v != defaults[k]]
        if given:
            raise UserError(f"{', '.join(given)} without --lora_rank: these configure LoRA; add --lora_rank R "
                            "(e.g. 16) or drop them")
    else:
        lora.check_options(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
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
    check_report_to(cfg)
    return device


def check_report_to(cfg):
    """--report_to and --use_wandb: known names, and their packages installed (needed only when asked for)."""
    names = metrics.report_to_names(cfg.report_to) if isinstance(cfg.report_to, str) else None
    if names is None or any(n not in metrics.REPORT_TO for n in names) or not cfg.report_to.strip():
        raise UserError(f"--report_to {cfg.report_to!r:.60}: choose from {', '.join(metrics.REPORT_TO)}, "
                        "comma-separated (tensorboard,wandb)")
    if "tensorboard" in names:
        if (Path(cfg.output_dir) / "tensorboard").is_symlink():
            raise UserError(f"{Path(cfg.output_dir) / 'tensorboard'} is a link; --report_to tensorboard writes only "
                            "inside --output_dir: remove the link")
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard writes with it)
        except ImportError:
            raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard (or "
                            "drop --report_to tensorboard)") from None
    for flag, asked in (("--use_wandb", cfg.use_wandb), ("--report_to wandb", "wandb" in names)):
        if asked:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError(f"{flag} needs the wandb package: pip install wandb (or drop {flag})") from None


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


def check_output_dir_apart(cfg):
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


def check_pairs_left(loaded, train_items: list, eval_items: list, plan, dataset: list, max_length: int):
    """After loading and tokenising (support.heldout): pairs left to train on and, when the run evaluates,
    to evaluate on."""
    evaluating = plan.split != "none"
    for items, pairs, split, sources in ((train_items, loaded.train, "train", dataset),
                                         (eval_items, loaded.held_out, plan.split, plan.sources)):
        if not pairs and plan.fraction:  # the held-out share took every pair, or none
            raise UserError(f"--eval_fraction {plan.fraction} holds out {len(loaded.held_out)} of the "
                            f"{len(loaded.train) + len(loaded.held_out)} pairs of {', '.join(dataset)}, leaving "
                            f"nothing to {'train on' if loaded.held_out else 'evaluate'}; pass held-out files with "
                            "--eval_dataset, another --eval_fraction, or --eval_split none")
        if not items and (split == "train" or evaluating):
            raise UserError(f"all {len(pairs)} '{split}' pairs of {', '.join(sources)} are longer than "
                            f"--max_length {max_length} tokens (a response and its eos must fit); "
                            "raise --max_length")


def check_paths(flags: dict, utf8: set = frozenset()):
    """{flag: a path, a list of them, or None}: each one a path that can exist, in one line naming the flag.
    A name over NAME_MAX bytes ("File name too long") was an OSError traceback wherever the path was first
    used (after training, for --output_dir); the flags in `utf8` are written by libraries that take UTF-8
    paths only (tokenizers' save: a UnicodeEncodeError at the first checkpoint)."""
    for flag, values in flags.items():
        for value in [values] if isinstance(values, str) else values or []:
            raw = os.fsencode(value)
            longest = max(len(name) for name in raw.split(b"/"))
            shown = value if len(value) <= 60 else value[:60] + "..."
            if longest > NAME_MAX:
                raise UserError(f"{flag} {shown}: a name in it is {longest:,} bytes, over the {NAME_MAX} a file "
                                "system allows; choose a shorter path")
            if len(raw) >= PATH_MAX:
                raise UserError(f"{flag} {shown}: {len(raw):,} bytes, over the {PATH_MAX - 1} a path may have; "
                                "choose a shorter path")
            if flag in utf8 and raw.decode("utf-8", "replace").encode() != raw:
                raise UserError(f"{flag} {value!r}: the path is not valid UTF-8 (a byte of another encoding in a "
                                "name), which the tokenizer library cannot write to; choose a UTF-8 name")


def check_eval_args(args):
    """eval.py's flags: everything that can be checked without work is checked before minutes of loading and
    scoring. Returns `args` with the device chosen."""
    check_paths({"CHECKPOINT": args.checkpoint, "--dataset": args.dataset, "--output": args.output,
                 "--plots": args.plots, "--chat_template": args.chat_template})
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max_length {args.max_length} is too small; use at least 2 (one token + eos)")
    if not (args.unsure_threshold >= 0 and math.isfinite(args.unsure_threshold)):
        raise UserError(f"--unsure_threshold {args.unsure_threshold} must be a number >= 0")
    report_files.check_plots(args.plots)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is available to torch; use --device cpu")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def trained_settings(model_dir: Path) -> dict:
    """What config.json records of the reward model's training (dataset, max_length, share_prompt, ...).
    A plain language model is refused: it would load with a freshly initialised random head, and its
    scores would mean nothing."""
    raw = hub.read_json(model_dir / "config.json", "a model directory must hold config.json")
    settings = export.reward_model_config(raw, model_dir)
    if settings is None:
        raise UserError(f"{model_dir} is not a reward model (architectures {raw.get('architectures')}, no "
                        f"\"reward_model\" entry in config.json): its reward head would be random; train one "
                        f"with train.py or pass a Qwen3ForSequenceClassification checkpoint")
    return settings
