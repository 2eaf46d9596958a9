"""Train a Qwen3 reward model: one hand-written loop, readable top to bottom.

    python train.py --config demo                        # tiny model, synthetic task, CPU, ~1.5 minutes
    python train.py --model Qwen/Qwen3-0.6B --bf16       # the real thing, on Anthropic/hh-rlhf
    torchrun --nproc_per_node=8 train.py --config qwen3_1.7b --bf16 --fsdp

One optimizer step: take the next global batch of preference pairs (length-grouped, deterministic for the
seed; under torchrun each process takes its slice); for each micro-batch, chosen + rejected in ONE forward
pass -> rewards -> pairwise loss (or, for ranked groups, --loss listwise/all_pairs) -> backward; clip the
gradient norm, step AdamW and the LR schedule (linear warmup, cosine decay to 0). A checkpoint holds
everything needed to continue exactly: a resumed run ends with an uninterrupted one's weights (bitwise on CPU).

The flags to know first (TrainConfig, after the loop, has all of them): --config, --model, --dataset,
--max_length, --batch_size, --gradient_accumulation_steps, --learning_rate, --num_epochs or --max_steps,
--bf16, --output_dir (and --resume to continue a run).

Output directory: final_model/, best_model_step_N/, checkpoint_step_N/ (the newest --save_total_limit),
evaluation_report.json, train_config.json, log.jsonl. The machinery lives in support/: run (the output
directory, resume, checkpoints), validate, heldout (which pairs are held out), metrics (logging, W&B,
TensorBoard), cli (the flags, from TrainConfig's fields), distributed (torchrun, DDP/FSDP2).
"""
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
from qwen3 import SHAPES as MODEL_SHAPES
from rm import HEADS, POOLINGS, RewardModel, all_pairs_loss, listwise_loss, pairwise_loss
from support import checkpoint, cli, distributed, heldout, lora, metrics, packing, ranked, report, validate
from support import run as run_context
from support.distributed import print0
from support.errors import UserError, run_cli
from support.cli import option


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: "TrainConfig") -> dict:
    """Train as `cfg` says. Returns step, output_dir, final_model, eval_accuracy, report and history (the
    records of log.jsonl); after a Ctrl-C or SIGTERM, stopped_at, checkpoint and signal instead."""
    run = run_context.Run(cfg, validate.validate(cfg))  # torchrun, the output directory, the --resume checkpoint
    rank, world, device = run.rank, run.world, run.device

    # ---- the model and the data: pairs -> token ids, in an order fixed by the seed
    model = build_model(cfg)
    train_items, held_out, data_read = load_data(cfg, model.tokenizer)  # a --chat_template PATH becomes the tokenizer's
    # what the run evaluates on, as train_config.json, the checkpoints, the report and config.json record it
    cfg = dataclasses.replace(cfg, eval_split=held_out.split, eval_fraction=held_out.fraction)
    step_batch = cfg.batch_size * cfg.gradient_accumulation_steps * world  # pairs per optimizer step
    batches = StepBatches(train_items, step_batch, cfg.seed)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(batches.steps_per_epoch * cfg.num_epochs))
    model.provenance = {"dataset": list(cfg.dataset), "eval_dataset": held_out.sources, "eval_split": cfg.eval_split,
                        "eval_fraction": cfg.eval_fraction, "max_length": cfg.max_length,
                        "share_prompt": cfg.share_prompt, "dedup": cfg.dedup}

    # ---- what trains it: the (wrapped) model, the optimizer, the schedule; on --resume, their saved states
    run.check_resume(cfg, step_batch, total_steps, data_read)  # before its weights load: another run is refused
    train_model = prepare_model(model, cfg, device, world, run.resume_from)
    optimizer = make_optimizer(cfg, train_model, device)
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps))
    step = run.start(cfg, model, train_model, optimizer, scheduler, total_steps, step_batch, data_read)

    # ---- what the loop uses: the batch layout, bf16 autocast, the metrics since the last log line, Ctrl-C
    collate = packing.choose_collate(cfg.packing, cfg.share_prompt)  # data.collate, or packed/shared-prompt rows
    if cfg.loss != "pairwise":  # ranked groups of K responses, a group's prompt once with --share_prompt
        collate = ranked.choose_collate(cfg.packing, cfg.share_prompt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    since_last_log, last_report = metrics.MetricsSinceLastLog(device), None  # last_report: the last step's report
    stop = checkpoint.SignalStop()  # Ctrl-C / SIGTERM: finish the step, checkpoint, print a resume line
    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and rank == 0))
    try:
        with stop, bar:
            while step < total_steps:
                # -- one optimizer step. One process without accumulation: one micro-batch, weight 1 (more
                # micro-batches or processes: see StepBatches.micro_batches, the step still equals one batch).
                micro_batches = batches.micro_batches(step, cfg.batch_size, rank, world)
                sums = metrics.StepSums(device, world)  # loss, accuracy, margin, tokens
                for i, (idx, weight) in enumerate(micro_batches):
                    batch = collate([train_items[j] for j in idx], model.tokenizer.pad_id).to(device)
                    with distributed.no_sync(train_model, sync=i == len(micro_batches) - 1), autocast:
                        rewards = train_model(batch.input_ids, batch.attention_mask, batch.layout)  # (2B,)
                    if cfg.loss == "pairwise":
                        chosen, rejected = rewards.chunk(2)  # rows 0..B-1 are the chosen responses
                        losses = pairwise_loss(chosen, rejected, batch.margin, cfg.center_rewards_coefficient)
                    else:  # B groups: each sequence's group and level; both losses are a mean over groups
                        losses = (listwise_loss if cfg.loss == "listwise" else all_pairs_loss)(
                            rewards, batch.group, batch.level, batch.num_groups)
                    (losses["loss"] * weight).backward()
                    sums.add(losses, batch, weight)
                step_metrics = sums.over_processes()
                run.stop_if_not_finite("loss", step_metrics.loss, step + 1)
                grad_norm = clip_grad_norm(train_model, cfg.max_grad_norm)
                # a finite loss can still have an overflowing gradient
                run.stop_if_not_finite("gradient norm", float(grad_norm), step + 1, before_update=True)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged, as TRL does)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                since_last_log.add(step_metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{step_metrics.loss:.4f}", acc=f"{step_metrics.accuracy:.3f}")

                # -- log, evaluate (keeping the best model), checkpoint, stop on a signal
                if step % cfg.logging_steps == 0 or step == total_steps:
                    run.log(since_last_log.record(step, step / batches.steps_per_epoch, lr, grad_norm, device))
                if held_out.items and (step % cfg.eval_steps == 0 or step == total_steps):
                    last_report = run.evaluate_and_keep_best(step, lambda m: evaluate_held_out(m, held_out, cfg))
                saved = step % cfg.save_steps == 0 and step < total_steps
                if saved:
                    run.save(step)
                if stop.requested(world, device) and step < total_steps:
                    path = run.out / f"checkpoint_step_{step}" if saved else run.save(step)  # not the same one twice
                    print0(checkpoint.stopped_message(stop.signal, path, step, total_steps))
                    return {"stopped_at": step, "checkpoint": str(path), "signal": stop.signal}
        final_report = last_report if step == total_steps else None  # scored at the last step: not again
        return run.finish(step, held_out, final_report,  # final_model/, evaluation_report.json
                          lambda m: evaluate_held_out(m, held_out, cfg, progress=cfg.progress))
    except checkpoint.ForcedStop:  # a second Ctrl-C: out at once, saying which checkpoint is intact
        raise run.forced_stop(step, stop.signal) from None
    finally:
        run.release()  # the next run may take the directory (rank 0 holds it from the claim)


# ----------------------------------------------------------------------------------------------
# The pieces: the model, the data and its order, the optimizer and the schedule, clipping, evaluation


def build_model(cfg: "TrainConfig") -> RewardModel:
    """From scratch (the demo: a qwen3.SHAPES shape, the demo tokenizer's vocabulary), or a checkpoint."""
    if cfg.from_scratch:
        from support import demo
        tokenizer = demo.demo_tokenizer()
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


def load_data(cfg: "TrainConfig", tokenizer) -> tuple[list, heldout.HeldOut, dict]:
    """Pairs -> token ids, for training and held out (support/heldout.py decides which pairs are held out);
    every skipped or dropped pair is counted and reported. Also returns what was read (pairs and files), for
    a resume to notice data that changed."""
    plan = heldout.plan_training(cfg.dataset, cfg.eval_dataset, cfg.eval_split, cfg.eval_fraction)
    chat_format = tokenizer.chat_format(cfg.chat_template)  # renders conversational rows
    groups = cfg.loss != "pairwise" or ranked.is_ranked(cfg.dataset)  # ranked rows: groups (support/ranked.py)
    pairs = heldout.load(plan, cfg.dataset, cfg.max_train_samples, cfg.max_eval_samples, chat_format,
                         dedup=cfg.dedup, decontaminate=cfg.decontaminate, groups=groups,
                         char_cap=tokenizer.char_cap(cfg.max_length))  # texts cut as read: bounded memory
    train_items = ranked.training_items(pairs.train, cfg, tokenizer, pairs.train_stats) if groups else \
        data.tokenize_pairs(pairs.train, tokenizer, cfg.max_length, pairs.train_stats)
    # Tokenised once, here: a held-out set that cannot be evaluated fails now, not at the first evaluation.
    eval_items = (ranked.tokenize_groups if groups else data.tokenize_pairs)(
        pairs.held_out, tokenizer, cfg.max_length, pairs.held_out_stats) if plan.split != "none" else []
    validate.check_pairs_left(pairs, train_items, eval_items, plan, cfg.dataset, cfg.max_length)
    held = f" (held out of the training pairs by content hash: --eval_fraction {plan.fraction})" \
        if plan.fraction else ""
    print0(report.data_line(len(train_items), len(eval_items), held, pairs.train_stats.report(),
                            pairs.held_out_stats.report()) + pairs.removal)
    return train_items, heldout.HeldOut(eval_items, pairs.held_out_stats, *plan), heldout.what_was_read(
        plan, cfg.dataset, pairs, (ranked.groups_digest if groups else data.pairs_digest)(pairs.train))


class StepBatches:
    """Which pairs (or ranked groups) each optimizer step trains on. One step consumes one "step batch" of
    batch_size x accumulation x processes pairs, and the order of step batches depends only on the seed and the epoch:
    1 process x batch 8, 2 processes x batch 4 and batch 4 x 2 accumulation steps all see exactly the same
    pairs at every step, and a resumed run picks the data order up at its step."""
    def __init__(self, items: list, step_batch: int, seed: int):
        self.lengths = [it.tokens for it in items]  # a pair's or a ranked group's tokens
        self.step_batch, self.seed = step_batch, seed
        self.steps_per_epoch = math.ceil(len(items) / step_batch)
        self.epoch, self.order = None, None

    def micro_batches(self, step: int, batch_size: int, rank: int, world: int) -> list[tuple[list[int], float]]:
        """This process's micro-batches of optimizer step `step`: (indices into the items, weight). The weight
        is the micro-batch's share of the step's pairs (or groups), times the processes (DDP averages the gradients over
        them), so that accumulation and data parallelism equal one big batch exactly; one process without
        accumulation: weight 1. A process whose slice of a short last batch is empty still runs, on a stand-in
        pair (index 0) of weight 0, because every process must join each gradient all-reduce."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, data.batch_order(self.lengths, self.step_batch, self.seed, epoch)
        idx = self.order[j]
        per_micro = batch_size * world
        slices = [idx[i:i + per_micro][rank::world] for i in range(0, len(idx), per_micro)]
        return [(mine or [0], len(mine) / len(idx) * world) for mine in slices]


def prepare_model(model: RewardModel, cfg: "TrainConfig", device, world: int, resume_from: Path | None):
    """The model as it trains: resumed weights, on the device, int8, LoRA adapters, frozen layers,
    recomputed activations, compiled blocks; returned wrapped for DDP/FSDP under torchrun (`model`
    itself stays the one to save)."""
    if cfg.lora_rank is not None:  # the base as loaded, before int8 or bf16 change it: what adapters need
        fingerprint = lora.base_fingerprint(model)
    if resume_from is not None:  # weights first, then the options that change the modules
        adapters = run_context.resume_weights(model, cfg, resume_from,
                                              fingerprint if cfg.lora_rank is not None else None)
    model.to(device)
    if device.type == "cpu":
        run_context.use_one_thread_if_tiny(model)
    if cfg.model_8bit:  # after the move: bitsandbytes quantises while placing the weights on the device
        model.quantize_8bit()
    if cfg.lora_rank is not None:  # frozen fp32 / bf16 (--bf16) / int8 (--8bit_model) base, adapters on top
        lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, seed=cfg.seed,
                      base_dtype=torch.bfloat16 if cfg.bf16 else None)
        model.lora_config.update(base_model=cfg.model, base_fingerprint=fingerprint, base_8bit=cfg.model_8bit)
        if resume_from is not None:
            lora.load_adapter_state_dict(model, adapters, where=str(resume_from / "adapters"))
    model.freeze_layers(cfg.freeze_layers)
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    train_model = distributed.wrap(model, cfg.fsdp, device, world)
    if cfg.compile:  # each block compiled in place: one compilation for all of them (see Qwen3.compile_blocks)
        model.model.compile_blocks()
    return train_model


def make_optimizer(cfg: "TrainConfig", model, device):
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
    """The share of the peak learning rate at `step`: linear warmup, (step + 1) / (warmup_steps + 1) (the
    first step trains at 1/(warmup_steps + 1) of the peak, not at 0), then cosine decay to 0 at total_steps."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def clip_grad_norm(model, max_norm: float):
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def evaluate_held_out(model, held_out: heldout.HeldOut, cfg: "TrainConfig", progress: bool = False) -> dict:
    """eval.py's report on the held-out pairs (tokenised once, before training)."""
    from eval import evaluate
    return evaluate(model, held_out.items, batch_size=cfg.batch_size * 2, max_length=cfg.max_length, bf16=cfg.bf16,
                    progress=progress, stats=held_out.stats, share_prompt=cfg.share_prompt)


# ----------------------------------------------------------------------------------------------
# The settings: every flag, with its help; the ones to know first are in the docstring at the top


@dataclass
class TrainConfig:
    """Every setting of a run; each field is a flag of the same name (support/cli.py), its help here."""
    # model
    model: str = option("Qwen/Qwen3-0.6B", "Hub repo id or local checkpoint dir", flags=["--model", "--model_name"])
    from_scratch: bool = option(False, "random init of a qwen3.SHAPES shape (tiny, 0.6b, 1.7b) with the demo's "
                                       "tokenizer: for the demo and tests")
    head: str | None = option(None, "reward head (default: the checkpoint's, else mlp)", choices=HEADS)
    pooling: str | None = option(None, "pooling (default: the checkpoint's, else mean)", choices=POOLINGS)
    # data
    dataset: list = option(["Anthropic/hh-rlhf"], "one or more sources: Hub dataset ids, files, dirs, globs, 'demo'")
    eval_split: str = option("test", "held-out split for evaluation; 'none' turns evaluation off")
    eval_dataset: list | None = option(None, "held-out sources (default: --dataset at --eval_split)")
    eval_fraction: float | None = option(
        None, "evaluate on this share of the training pairs, held out by a hash of each pair's text (none of them "
              f"trained on); {heldout.DEFAULT_EVAL_FRACTION} when the evaluation data would be the training files "
              "(a local file has no splits)")
    max_train_samples: int | None = option(None, "use at most this many training pairs")
    max_eval_samples: int | None = option(1000, "evaluate on at most this many pairs")
    max_length: int = option(1024, "max tokens per sequence (prompt cut from the left)")
    dedup: bool = option(False, "drop repeated and reversed pairs (up to case, spaces), before the held-out split")
    decontaminate: list | None = option(None, "drop training pairs whose prompt shares a 13-gram of words with a "
                                              "prompt of these benchmark files", metavar="PATH")
    chat_template: str = option("auto", "conversational rows (lists of messages): auto renders them with the model's "
                                "chat template, PATH with that .jinja file (saved with the model), none refuses "
                                "them", metavar="auto|none|PATH")
    # optimisation
    batch_size: int = option(8, "pairs per micro-batch per process")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(5e-6, "peak learning rate")
    num_epochs: float = option(3, "passes over the training pairs")
    max_steps: int = option(-1, "optimizer steps; > 0 overrides --num_epochs (-1: train --num_epochs)")
    warmup_ratio: float = option(0.03, "share of steps with linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)")
    center_rewards_coefficient: float = option(0.0, "weight of mean((r_c + r_r)^2)")
    loss: str = option("pairwise", "pairwise (Bradley-Terry), listwise (Plackett-Luce over a ranked group) or "
                       "all_pairs (Bradley-Terry over every ordered pair of a group); with listwise and all_pairs "
                       "--batch_size counts groups (a pair is a group of two)",
                       choices=["pairwise", "listwise", "all_pairs"])
    pairs_from_ranked: str | None = option(None, "--loss pairwise on ranked rows: the pairs each group gives, "
                                           "best_vs_random (default; seeded), best_vs_worst or all",
                                           choices=ranked.PAIRS_FROM_RANKED)
    # memory and speed
    freeze_layers: int = option(0, "freeze the embeddings and the first N blocks (0: nothing frozen)")
    bf16: bool = option(False, "bf16 autocast over fp32 master weights")
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    optim_8bit: bool = option(False, "bitsandbytes AdamW8bit", flags=["--8bit_optim"])
    model_8bit: bool = option(False, "frozen int8 backbone (bitsandbytes Linear8bitLt); trains the head and norms",
                              flags=["--8bit_model"])
    compile: bool = option(False, "torch.compile each transformer block (Qwen3.compile_blocks)")
    packing: bool = option(False, "padding-free: a micro-batch's sequences end to end in one row (support/packing.py)")
    share_prompt: bool = option(False, "each pair's prompt runs through the model once, not twice, no padding either "
                                       "(same results); attention on padded rows, or packed ones with --packing")
    fsdp: bool = option(False, "under torchrun: FSDP2 instead of DDP")
    # LoRA (support/lora.py): low-rank adapters on the frozen backbone; the head trains fully
    lora_rank: int | None = option(None, "train rank-R LoRA adapters on a frozen backbone (and the head); saved merged")
    lora_alpha: float | None = option(None, "LoRA scale alpha/R (default: 2R)")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    lora_targets: str = option("q,k,v,o,gate,up,down", "comma-separated layers to adapt, from q,k,v,o,gate,up,down")
    save_adapters: bool = option(False, "with --lora_rank: also write final_adapters/ (adapters and head alone, small)")
    # bookkeeping
    eval_steps: int = option(200, "evaluate every N steps")
    save_steps: int = option(500, "checkpoint every N steps")
    save_total_limit: int = option(2, "keep the newest N checkpoints")
    logging_steps: int = option(10, "log every N steps")
    output_dir: str = option("out/rm", "where checkpoints and the final model go")
    overwrite_output_dir: bool = option(False, "replace a previous run there")
    resume: str | None = option(
        None, "continue from the latest checkpoint in --output_dir (--resume alone, or --resume latest), or from "
              "the given checkpoint directory. Refused if these differ from the checkpoint's: "
              + ", ".join(checkpoint.SAME_RUN) + ", or the pairs per step, or the training pairs read. Any other "
              "flag may change and applies from the resumed step on (a new --learning_rate or --max_steps: this "
              "run's schedule)", nargs="?", const="latest")
    seed: int = option(42, "random seed (init, data order)")
    device: str | None = option(None, "cuda, cpu, ... (default: cuda if available)")
    use_wandb: bool = option(False, "log to Weights & Biases (as --report_to wandb)")
    report_to: str = option("none", "also log each record to: tensorboard (event files in OUTPUT_DIR/tensorboard), "
                                    "wandb, both comma-separated, or none", metavar="none|tensorboard|wandb")
    wandb_project: str = option("qwen3-rm", "W&B project name")
    progress: bool = option(True, "the progress bar")  # the flag is --no_progress (support/cli.py)


# Named configurations: --config NAME starts from these values, and any flag given overrides them.
MODELS = {"qwen3_0.6b": dict(model="Qwen/Qwen3-0.6B", batch_size=8, learning_rate=5e-6, num_epochs=3),
          "qwen3_1.7b": dict(model="Qwen/Qwen3-1.7B", batch_size=4, learning_rate=3e-6, num_epochs=3)}
SIZES = {"": dict(max_train_samples=5000, max_length=1024), "_small": dict(max_train_samples=1000, max_length=512),
         "_medium": dict(max_train_samples=20000, max_length=1024),
         "_large": dict(max_train_samples=None, max_length=2048)}
RUN_CONFIGS = {
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
# Command line: one flag per TrainConfig field (support/cli.py); --config NAME supplies defaults, flags override


def parse_command_line(argv=None) -> cli.CommandLine:
    """`python train.py [flags]`: the TrainConfig of --config NAME (RUN_CONFIGS) with the flags given on top."""
    return cli.parse_train_command_line(TrainConfig, RUN_CONFIGS, argv)


def main(argv=None):
    cfg, eval_only, model_path, given = parse_command_line(argv)
    if eval_only:  # exactly eval.py
        import eval as eval_cli
        return eval_cli.main(cli.eval_only_args(cfg, model_path, given))
    checkpoint.exit_if_stopped(lambda: train(cfg))  # stopped by a signal: exit status 128 + its number, not 0


if __name__ == "__main__":
    run_cli(main)
