"""The lesson, run: the first batch of the demo task through one training step, every stage printed, then
the same loop on to step 100 and what the model learned.

    python -m tools.walkthrough                                   # on the CPU, no download
    python -m tools.walkthrough --markdown > docs/walkthrough.md  # the checked-in document
    python -m tools.walkthrough --train_to 1                      # the first step only

It builds what `python train.py --config demo` builds (train.build_model: the tiny Qwen3 from scratch and
the demo tokenizer; data.load_pairs and data.tokenize_pairs on the demo's training split; the step's pairs
from train.StepBatches; train.make_optimizer and the warmup-cosine schedule), then takes the first step
apart: data.collate, the backbone, rm.pool, the head, rm.pairwise_loss, backward, train.clip_grad_norm,
AdamW. The weights it has after that step are the ones train.py has after its first step
(tests/test_walkthrough.py checks that, and that docs/walkthrough.md is this tool's output). Stage 10 runs
the same calls for the next steps, as train.py's loop does with one process, and scores the held-out split.
One thread and fixed seeds: the output is the same on every run.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

import data
import rm
import train
from support import demo
from support.errors import ArgumentParser, UserError, run_cli

PAIR = 0  # the pair of the batch whose texts and rows are shown (its rejected row is PAIR + B)
SHOW = 6  # values shown of a vector


class Stage(NamedTuple):
    title: str
    sentence: str  # what the stage does, in one sentence
    lines: list    # the code it ran, then shapes and values


class Walk(NamedTuple):
    stages: list
    model: rm.RewardModel  # after the step
    lr: float              # the rate the step used


def vec(t, digits: int = 4) -> str:
    """A few values of a 1-D tensor, at a fixed precision (the printout must not change between runs)."""
    values = t.detach().flatten().tolist()
    shown = ", ".join(f"{v:.{digits}f}" for v in values[:SHOW])
    return f"[{shown}{', ...' if len(values) > SHOW else ''}]"


def ids(values: list, limit: int = 16) -> str:
    return "[" + ", ".join(map(str, values[:limit])) + (", ...]" if len(values) > limit else "]")


def demo_config() -> train.TrainConfig:
    return train.TrainConfig(**train.RUN_CONFIGS["demo"])


def texts_and_ids(cfg: train.TrainConfig, model: rm.RewardModel):
    """Stages 1-2: the demo's pairs, tokenised; every pair's ids, the step order, and step 1's pairs."""
    tok = model.tokenizer
    pairs = data.load_pairs(cfg.dataset, "train", cfg.max_train_samples)
    items = data.tokenize_pairs(pairs, tok, cfg.max_length)
    batches = train.StepBatches(items, cfg.batch_size * cfg.gradient_accumulation_steps, cfg.seed)
    (idx, _), = batches.micro_batches(0, cfg.batch_size, rank=0, world=1)
    pair, item = pairs[idx[PAIR]], items[idx[PAIR]]
    texts = Stage("The texts", "Every source becomes pairs (prompt, chosen, rejected); the demo generates "
                  "hh-rlhf-style transcripts, and train.StepBatches picks the pairs of step 1.", [
        ">>> pairs = data.load_pairs(cfg.dataset, 'train', cfg.max_train_samples)",
        ">>> batches = train.StepBatches(items, cfg.batch_size * cfg.gradient_accumulation_steps, cfg.seed)"
        "  # items: stage 2; pairs per optimizer step, one process",
        ">>> (idx, _), = batches.micro_batches(0, cfg.batch_size, rank=0, world=1)",
        f"{len(pairs)} pairs; step 1 trains on {len(idx)} of them (batch_size {cfg.batch_size}), "
        f"pairs {ids(idx, 4)}",
        f"pair {PAIR} of the batch:",
        f"  prompt   {pair.prompt!r}",
        f"  chosen   {pair.chosen!r}",
        f"  rejected {pair.rejected!r}"])
    words = [tok.tok.id_to_token(i) for i in item.chosen_ids]
    n = item.prompt_len
    tokens = Stage("The token ids", "data.tokenize_pairs tokenises prompt + response whole for each response, "
                   "splits off the prompt's tokens (the same in both) and appends the eos token.", [
        ">>> items = data.tokenize_pairs(pairs, model.tokenizer, cfg.max_length)",
        f"vocabulary {tok.vocab_size} words; pad id {tok.pad_id} {tok.pad_token!r}, eos id {tok.eos_id} "
        f"{tok.eos_token!r}",
        f"pair {PAIR}: {item.prompt_len} prompt tokens, then {item.chosen_response_len} chosen / "
        f"{item.rejected_response_len} rejected response tokens, + eos",
        f"  prompt ids   {ids(item.chosen_ids[:n], 20)}",
        f"  prompt words {' '.join(words[:n])}",
        f"  chosen ids   {ids(item.chosen_ids[n:], 20)}",
        f"  rejected ids {ids(item.rejected_ids[n:], 20)}",
        f"  chosen words {' '.join(words[n:])}"])
    return [texts, tokens], items, batches, idx


def batch_stage(items: list, pad_id: int):
    """Stage 3: B pairs -> 2B padded rows, chosen first."""
    batch = data.collate(items, pad_id)
    B, (rows, T) = len(items), batch.input_ids.shape
    lines = [">>> batch = data.collate(items, model.tokenizer.pad_id)",
             f"input_ids {tuple(batch.input_ids.shape)}, attention_mask {tuple(batch.attention_mask.shape)}: "
             f"{B} pairs -> {rows} rows of {T} tokens, margin {batch.margin}"]
    ends = [int(batch.attention_mask[row].sum()) for row in (PAIR, PAIR + B)]
    window = slice(max(0, min(ends) - 6), min(T, min(ends) + 6))  # where the shorter row's padding starts
    for row, name, real in ((PAIR, "chosen", ends[0]), (PAIR + B, "rejected", ends[1])):
        mask = "".join(map(str, batch.attention_mask[row].tolist()))
        lines += [f"row {row:>2} = the {name} response of pair {PAIR}: {real} real tokens, then {T - real} pads",
                  f"  attention_mask {mask}",
                  f"  input_ids[{window.start}:{window.stop}] {batch.input_ids[row, window].tolist()}"]
    return Stage("The padded batch and its mask", "data.collate puts the B chosen sequences in rows 0..B-1 and "
                 "the B rejected ones in rows B..2B-1, right-padded with the pad id, so that one forward pass "
                 "scores both.", lines), batch


def forward_stages(model: rm.RewardModel, batch: data.Batch):
    """Stages 4-6: backbone -> hidden states -> pooled vectors -> rewards, as RewardModel.forward runs them."""
    input_ids, mask = batch.input_ids, batch.attention_mask
    hidden = model.model(input_ids, mask)
    last = int(mask[PAIR].sum()) - 1
    hidden_stage = Stage("The hidden states", "The Qwen3 backbone (qwen3.py) turns each token into a vector "
                         "of hidden_size numbers, final-normed, with no LM head: a reward model never needs "
                         "next-token logits.", [
        ">>> hidden = model.model(batch.input_ids, batch.attention_mask)",
        f"hidden {tuple(hidden.shape)} = (rows, tokens, hidden_size); config: {model.config.num_hidden_layers} "
        f"layers, hidden {model.config.hidden_size}, {model.config.num_attention_heads} query / "
        f"{model.config.num_key_value_heads} key-value heads",
        f"hidden[{PAIR}, 0]  (the first token)   {vec(hidden[PAIR, 0])}",
        f"hidden[{PAIR}, {last}] (its last real token) {vec(hidden[PAIR, last])}"])
    sequence_ids = rm.padded_sequence_ids(input_ids, mask)
    pooled = rm.pool(hidden, sequence_ids, input_ids.shape[0], model.pooling)
    simple = rm.pool_padded(hidden, mask, model.pooling)
    what, by_hand, expr = (("the last real token (here the eos that data.tokenize_pairs appends), which has "
                            "attended to the whole conversation", hidden[PAIR, last], f"hidden[{PAIR}, {last}]")
                           if model.pooling == "last" else
                           ("the mean over the sequence's real tokens", hidden[PAIR, :last + 1].mean(0),
                            f"hidden[{PAIR}, :{last + 1}].mean(0)"))
    pooled_stage = Stage("The pooled vectors", f"rm.pool makes one vector per sequence; the demo pools "
                         f"'{model.pooling}', {what}. rm.pool_padded is the same for padded rows, written simply.", [
        ">>> pooled = rm.pool(hidden, rm.padded_sequence_ids(batch.input_ids, batch.attention_mask), "
        f"{input_ids.shape[0]}, {model.pooling!r})",
        f"pooled {tuple(pooled.shape)} = (rows, hidden_size)",
        f"pooled[{PAIR}] {vec(pooled[PAIR])}  (= {expr}: {torch.allclose(pooled[PAIR], by_hand, atol=1e-6)})",
        f"rm.pool_padded(hidden, batch.attention_mask, {model.pooling!r}) is pooled: "
        f"{torch.allclose(simple, pooled, atol=1e-6)}"])
    rewards = model.head(pooled).sum(-1)  # (2B, 1) -> (2B,), as RewardModel.forward does
    chosen, rejected = rewards.chunk(2)
    reward_stage = Stage("The rewards, chosen and rejected", f"The '{model.head_type}' head maps each pooled "
                         "vector to one number, and chunk(2) splits the 2B rewards into the chosen half and the "
                         "rejected half, pair i against pair i.", [
        ">>> rewards = model.head(pooled).sum(-1); chosen, rejected = rewards.chunk(2)",
        f"rewards {tuple(rewards.shape)} -> chosen {tuple(chosen.shape)}, rejected {tuple(rejected.shape)} "
        f"(the same as RewardModel.forward: {torch.equal(rewards, model(input_ids, mask))})",
        f"chosen   {vec(chosen, 6)}  mean {chosen.mean().item():.6f}",
        f"rejected {vec(rejected, 6)}  mean {rejected.mean().item():.6f}",
        f"chosen - rejected {vec(chosen - rejected, 6)}"])
    return [hidden_stage, pooled_stage, reward_stage], chosen, rejected


def loss_stage(chosen, rejected, batch: data.Batch, cfg: train.TrainConfig):
    """Stage 7: the Bradley-Terry loss, and the same number by hand."""
    out = rm.pairwise_loss(chosen, rejected, batch.margin, cfg.center_rewards_coefficient)
    by_hand = -F.logsigmoid(chosen - rejected).mean()
    return Stage("The loss", "rm.pairwise_loss is the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), "
                 "averaged over the pairs; an untrained model's rewards are all near 0, so it starts near "
                 "log 2.", [
        ">>> out = rm.pairwise_loss(chosen, rejected, batch.margin, cfg.center_rewards_coefficient)",
        f"loss {out['loss'].item():.6f}  (by hand, -logsigmoid(chosen - rejected).mean(): "
        f"{by_hand.item():.6f}; log 2 = {math.log(2):.6f})",
        f"accuracy {out['accuracy'].item():.4f} ({int((chosen > rejected).sum())} of {len(chosen)} pairs have "
        f"chosen > rejected), mean margin {out['margin'].item():.6f}"]), out["loss"]


def step_stages(model: rm.RewardModel, loss, optimizer, scheduler, cfg: train.TrainConfig, total_steps: int,
                batch_ids: list):
    """Stages 8-9: backward, the gradient norm and its clipping, then AdamW's step on one parameter."""
    loss.backward()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(train.clip_grad_norm(model, cfg.max_grad_norm))
    after_clip = float(torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
    norm_stage = Stage("The gradient norm", "loss.backward() fills every parameter's .grad, and "
                       "train.clip_grad_norm scales them all down when their joint norm exceeds max_grad_norm.", [
        ">>> loss.backward(); grad_norm = train.clip_grad_norm(model, cfg.max_grad_norm)",
        f"{len(with_grad)} parameter tensors ({sum(p.numel() for p in with_grad):,} numbers) have a gradient",
        f"gradient norm {grad_norm:.4f}; max_grad_norm {cfg.max_grad_norm} -> after clipping {after_clip:.4f}"])
    name = "head.fc2.weight" if model.head_type == "mlp" else "head.weight"
    param = dict(model.named_parameters())[name]
    before, grad = param.detach()[0].clone(), param.grad[0].clone()
    embeddings = model.model.embed_tokens.weight
    embeddings_before = embeddings.detach().clone()
    lr = scheduler.get_last_lr()[0]  # the rate this step uses
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    after = param.detach()[0]
    step_stage = Stage("One parameter after the step", "AdamW moves every weight whose gradient is not zero; its "
                       "first step moves each by about the learning rate (m / sqrt(v) is g / |g| at step 1), "
                       "whatever the gradient's size, and the warmup makes that rate small.", [
        ">>> optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)",
        f"learning rate of step 1: {lr:.4e} (peak {cfg.learning_rate}, reached after a linear warmup over "
        f"{int(cfg.warmup_ratio * total_steps)} of the run's {total_steps} steps)",
        f"{name} {tuple(param.shape)}, its first {SHOW} values:",
        f"  before   {vec(before, 6)}",
        f"  gradient {vec(grad, 6)}",
        f"  after    {vec(after, 6)}",
        f"  change   {vec((after - before) * 1e5, 4)} x 1e-5",
        f"embedding rows that moved: {int((embeddings != embeddings_before).any(1).sum())} of {embeddings.shape[0]}, "
        f"the tokens this batch holds ({len(set(batch_ids))}); the others had a zero gradient"])
    return [norm_stage, step_stage], lr


def score_pairs(model: rm.RewardModel, items: list, batch_size: int = 64):
    """Chosen and rejected rewards of tokenised pairs, as training computes them (data.collate, one pass)."""
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = data.collate(items[start:start + batch_size], model.tokenizer.pad_id)
            c, r = model(batch.input_ids, batch.attention_mask).chunk(2)
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def held_out_by_kind(model: rm.RewardModel, cfg: train.TrainConfig) -> list[tuple[str, int, float]]:
    """(kind, pairs, accuracy) on the demo's test split: all pairs, then by what is wrong with the rejected."""
    pairs = data.load_pairs(cfg.dataset, "test", cfg.max_eval_samples)
    rude = tuple(o.strip() for o in demo.DEMO_RUDE[0])
    kinds = [("all", pairs), ("rude, on topic", [p for p in pairs if p.rejected.strip().startswith(rude)]),
             ("polite, another topic", [p for p in pairs if not p.rejected.strip().startswith(rude)])]
    out = []
    for kind, some in kinds:
        chosen, rejected = score_pairs(model, data.tokenize_pairs(some, model.tokenizer, cfg.max_length))
        out.append((kind, len(chosen), (chosen > rejected).float().mean().item()))
    return out


def training_stage(model: rm.RewardModel, optimizer, scheduler, cfg: train.TrainConfig, batches, items: list,
                   step1: tuple, steps: int, total_steps: int):
    """Stage 10: train.py's loop (one process, padded batches) on to step `steps`, then what it learned: the
    loss and accuracy by windows of steps, pair PAIR's rewards again, and the held-out accuracy."""
    pair_item, before, first_loss, first_accuracy = step1
    losses, accuracies = [first_loss], [first_accuracy]
    for step in range(1, steps):  # step 1 was stages 3-9
        (idx, _), = batches.micro_batches(step, cfg.batch_size, rank=0, world=1)
        batch = data.collate([items[i] for i in idx], model.tokenizer.pad_id)
        chosen, rejected = model(batch.input_ids, batch.attention_mask).chunk(2)
        out = rm.pairwise_loss(chosen, rejected, batch.margin, cfg.center_rewards_coefficient)
        out["loss"].backward()
        train.clip_grad_norm(model, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out["loss"].item())
        accuracies.append(out["accuracy"].item())
    model.eval()
    (after_c,), (after_r,) = score_pairs(model, [pair_item])
    margin = after_c.item() - after_r.item()
    windows = min(4, steps)
    w = steps // windows
    lines = [">>> for step in range(1, steps): ...  # stages 3-9 for each step's pairs: data.collate, model, chunk(2),",
             "...     # rm.pairwise_loss, backward, train.clip_grad_norm, optimizer.step, scheduler.step",
             f"{steps} of the demo's {total_steps} steps, on its schedule (the rate is now "
             f"{scheduler.get_last_lr()[0]:.2e}); mean training loss and accuracy over each {w} steps:"]
    lines += [f"  steps {i + 1:>3}-{i + w:<3} loss {sum(losses[i:i + w]) / w:.3f}  accuracy "
              f"{sum(accuracies[i:i + w]) / w:.3f}" for i in range(0, windows * w, w)]
    lines += [f"pair {PAIR} of step 1 (stage 1), rewards before -> after training:",
              f"  chosen   {before[0]:.3f} -> {after_c.item():.3f}",
              f"  rejected {before[1]:.3f} -> {after_r.item():.3f}",
              f"  margin {margin:.2f}: the model gives P(chosen preferred) = sigmoid(margin) = "
              f"{torch.sigmoid(torch.tensor(margin)).item():.3f}",
              f"held-out accuracy on the test split ({cfg.max_eval_samples} pairs, asked in (topic, question) "
              "combinations never seen in training), by what is wrong with the rejected response:"]
    lines += [f"  {kind:<22} {n:>4} pairs  accuracy {acc:.3f}" for kind, n, acc in held_out_by_kind(model, cfg)]
    return Stage("After training", f"Steps 2 to {steps} make the same calls as stages 3-9 on the next pairs of "
                 "train.StepBatches (train.py's loop, one process). Rudeness, visible in the response alone, is "
                 "learned first; the topic, which needs the prompt, comes later: this is the plateau at 0.75, where "
                 "a loss near log 2 / 2 = 0.35 means half the pairs solved and half still at chance.", lines)


def walk(cfg: train.TrainConfig, total_steps: int | None = None, train_to: int = 1) -> Walk:
    """train.py's first optimizer step on `cfg` (padded batches, one process, no accumulation), stage by
    stage; with train_to > 1, then its loop on to step train_to (stage 10). total_steps sets the schedule's
    length (default: as train.py computes it for cfg)."""
    torch.set_num_threads(1)  # as train.py runs the tiny demo model; one thread also keeps sums in one order
    model = train.build_model(cfg)
    model.train()
    first, items, batches, idx = texts_and_ids(cfg, model)
    if total_steps is None:  # as train() computes it
        total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, int(batches.steps_per_epoch * cfg.num_epochs))
    optimizer = train.make_optimizer(cfg, model, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, train.lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps)))
    batch_st, batch = batch_stage([items[i] for i in idx], model.tokenizer.pad_id)
    forward, chosen, rejected = forward_stages(model, batch)
    loss_st, loss = loss_stage(chosen, rejected, batch, cfg)
    step1 = (items[idx[PAIR]], (chosen[PAIR].item(), rejected[PAIR].item()), loss.item(),
             (chosen > rejected).float().mean().item())
    last, lr = step_stages(model, loss, optimizer, scheduler, cfg, total_steps,
                           batch.input_ids[batch.attention_mask.bool()].tolist())
    stages = first + [batch_st] + forward + [loss_st] + last
    if train_to > 1:
        stages.append(training_stage(model, optimizer, scheduler, cfg, batches, items, step1, train_to, total_steps))
    return Walk(stages, model, lr)


INTRO = """\
The first optimizer step of `python train.py --config demo`, taken apart: one batch of the demo task
(synthetic preference pairs, a tiny Qwen3 from scratch) from its texts to what one weight became, then
the same step repeated to step 100, and what the model has learned by then.
In short: `data.collate` pads B pairs into 2B rows (`data.Batch`); `train.py` passes them to
`RewardModel` (`rm.py`), which runs `Qwen3` (`qwen3.py`) and pools one reward per row; `train.py` splits
the rewards with `chunk(2)` and calls `pairwise_loss` on the two halves.

The demo task (`support/demo.py`): a human asks about one of 16 topics (cats, chess, volcanoes, ...),
sometimes after a first exchange on it. The chosen response is polite and on the asked topic. The
rejected one is, in half the pairs, rude but on topic, and in the other half polite but about another
topic; both come from the same templates, so length tells nothing. Rudeness shows in the response alone
and is learned first: it settles 75% of the pairs, the plateau stage 10 reaches. The other 25% need the
response read against the prompt, which the full run learns later (0.99 held out after 1,000 steps:
[training_curves.md](training_curves.md)). The held-out split asks with (topic, question) combinations
never seen in training.

Each stage shows the lesson's own call that produced it, then shapes and a few values. Regenerate this
page with `python -m tools.walkthrough --markdown > docs/walkthrough.md` (CPU, no download; stage 10's 99
steps take most of its time, a tenth of the demo's 1,000, and `--train_to 1` skips them);
`tests/test_walkthrough.py` fails when it no longer matches the code, and checks that the weights after
the first step are the ones train.py has after its first step."""

TRAIN_TO = 100  # stage 10's last step: the demo's plateau (rudeness learned), reached in seconds


def render(stages: list, markdown: bool) -> str:
    title = "# Walkthrough: one training step, every stage printed, and what training learns"
    out = [title, "", INTRO] if markdown else []
    for n, stage in enumerate(stages, 1):
        if markdown:
            out += ["", f"## {n}. {stage.title}", "", stage.sentence, "", "```text", *stage.lines, "```"]
        else:
            out += ["", f"== {n}. {stage.title}", stage.sentence, *stage.lines]
    return "\n".join(out).lstrip("\n") + "\n"


def main(argv=None):
    parser = ArgumentParser(prog="-m tools.walkthrough", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print docs/walkthrough.md (headings, code blocks)")
    parser.add_argument("--train_to", type=int, default=TRAIN_TO, help=f"stage 10 trains to this step (default "
                        f"{TRAIN_TO}; 1: the first step only)")
    args = parser.parse_args(argv)
    if not 1 <= args.train_to <= 1000:
        raise UserError(f"--train_to {args.train_to}: give a step from 1 to the demo's 1000")
    print(render(walk(demo_config(), train_to=args.train_to).stages, args.markdown), end="")


if __name__ == "__main__":
    run_cli(main)
