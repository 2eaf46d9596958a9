"""Evaluate a reward model on preference pairs: how often does it prefer the response people preferred?

    python eval.py out/rm/final_model                              # the data it was trained on, test split
    python eval.py out/demo --dataset demo --max_samples 200 --plots plots/   # a run's directory: its final_model
    python eval.py Skywork/Skywork-Reward-V2-Qwen3-0.6B --dataset Anthropic/hh-rlhf --bf16 --device cuda

- Each pair's chosen and rejected responses are scored in one forward pass, as in training; conversational
  rows are rendered with the model's saved chat template (--chat_template to choose another).
- The report (evaluation_report.json, and a table on stdout): accuracy with a 95% Wilson interval, overall
  and per source; reward and margin distributions; length bias; the Bradley-Terry loss; how many pairs were
  evaluated, skipped and dropped. report_from_rewards says exactly what each number is.
- Three layers, each usable and testable alone: report_from_rewards (statistics on arrays, plain numpy),
  evaluate(model, pairs) (tokenise, score, report: what train.py calls), main() (the command line; its
  flags are in support/cli.py, the printed table in support/report.py).
- CHECKPOINT: a model directory, a train.py checkpoint or output directory, or a Hub id of a
  Qwen3ForSequenceClassification; a plain language model is refused (its reward head would be random).
  By default: the test split of the training data, or the share of its training pairs that train.py held
  out (--eval_fraction), at the training max_length (all in config.json).
"""
import copy
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from support import benchmarks, cli, heldout, hub, ranked, scoring, validate
from support import report as report_files
from support.errors import UserError, check_writable, run_cli

Z95 = 1.959963984540054          # the 97.5% quantile of the standard normal: two-sided 95%
PERCENTILES = (5, 25, 50, 75, 95)
DEFAULT_DATASET = ["Anthropic/hh-rlhf"]
DEFAULT_MAX_LENGTH = 1024


# ----------------------------------------------------------------------------------------------
# Statistics (numpy only, no scipy). Stds are population stds (ddof=0). A statistic that is undefined
# (an empty group, the correlation of a constant) is None (null in the JSON), never NaN.


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple:
    """Wilson score interval for a binomial proportion: (low, high), or (None, None) when n == 0.
    Rather than the textbook p +- 1.96*sqrt(p(1-p)/n): it stays inside [0, 1] and does not collapse to
    zero width at 0% or 100%, which small per-source test sets do hit.

        center = (p + z^2/2n) / (1 + z^2/n)      half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    """
    if n == 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def pearson(x, y):
    """Pearson correlation; None when it is undefined (fewer than 2 points or a constant input)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denom == 0:
        return None
    return float((dx * dy).sum() / denom)


def average_ranks(x):
    """Ranks 1..n; tied values share the mean of the ranks they span (scipy.stats.rankdata's default):
    [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]."""
    _, run_of, run_length = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    last_rank = np.cumsum(run_length)                  # each run of equal values ends at this rank
    return (last_rank - (run_length - 1) / 2)[run_of]  # the mean of the ranks the run spans


def spearman(x, y):
    """Spearman's rho: the Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def describe(values, percentiles=PERCENTILES) -> dict:
    """mean, std (population), min, max and percentiles (numpy's linear interpolation) of a 1-D array."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {k: None for k in ("mean", "std", "min", "max", *(f"p{p}" for p in percentiles))}
    out = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
    out.update({f"p{p}": float(q) for p, q in zip(percentiles, np.percentile(v, percentiles))})
    return out


def bt_loss(margin) -> float | None:
    """Mean -log sigmoid(margin), computed stably as logaddexp(0, -margin)."""
    m = np.asarray(margin, dtype=np.float64)
    return float(np.logaddexp(0.0, -m).mean()) if m.size else None


def accuracy_block(correct) -> dict:
    """{"num_pairs", "accuracy", "ci95": [low, high]} of a boolean array (accuracy None when empty)."""
    correct = np.asarray(correct, dtype=bool)
    n, k = int(correct.size), int(correct.sum())
    low, high = wilson_interval(k, n)
    return {"num_pairs": n, "accuracy": k / n if n else None, "ci95": [low, high]}


def length_bias(c, r, lc, lr, correct) -> dict:
    """report["length"] (see report_from_rewards). Correlations over every response, chosen and rejected alike."""
    rewards_all, lengths_all = np.concatenate([c, r]), np.concatenate([lc, lr])
    longer, shorter, same = lc > lr, lc < lr, lc == lr
    differ = ~same
    return {
        "pearson": pearson(lengths_all, rewards_all),
        "spearman": spearman(lengths_all, rewards_all),
        "chosen_longer": accuracy_block(correct[longer]),
        "chosen_shorter": accuracy_block(correct[shorter]),
        "same_length": accuracy_block(correct[same]),
        # "prefer the longer response" is right exactly when chosen is the longer one; ties excluded
        "longer_is_better_accuracy": float(longer[differ].mean()) if differ.any() else None,
        "model_accuracy_on_different_length": float(correct[differ].mean()) if differ.any() else None,
        "num_different_length": int(differ.sum()),
    }


def report_from_rewards(chosen, rejected, chosen_len, rejected_len, sources=None,
                        unsure_threshold: float = 0.1) -> dict:
    """All the statistics of the report from per-pair rewards and response lengths (in tokens).

    chosen, rejected: rewards, one per pair; chosen_len, rejected_len: the responses' lengths in tokens;
    sources: the dataset each pair came from (None: all from one unnamed source).

    - accuracy: the share of pairs with r_chosen > r_rejected (a tie counts as wrong, as in training),
      with its 95% Wilson interval; overall and per source.
    - rewards: mean, std, min, max and the 5/25/50/75/95th percentiles of the chosen and rejected rewards.
    - margin = r_chosen - r_rejected: mean, std, min, max, and the share of pairs with |margin| below
      unsure_threshold: pairs on which the model is unsure.
    - length: reward models like to learn "longer is better". Pearson and Spearman correlation of reward
      and response length (chosen and rejected responses together); accuracy on pairs whose chosen
      response is longer, shorter, or the same length; and the accuracy of the rule "prefer the longer
      response" on the pairs whose lengths differ (ties excluded, not counted as half), next to the
      model's accuracy on those very pairs. A model no better than that rule has learnt little else.
    - loss: the mean Bradley-Terry loss -log sigmoid(margin), without the dataset's own target margins,
      so that it is comparable across datasets.
    """
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    lc, lr = np.asarray(chosen_len, dtype=np.int64), np.asarray(rejected_len, dtype=np.int64)
    n = c.size
    if not (r.size == lc.size == lr.size == n):
        raise ValueError(f"chosen/rejected/lengths must have one entry per pair: sizes "
                         f"{c.size}, {r.size}, {lc.size}, {lr.size}")
    sources = np.asarray(list(sources) if sources is not None else [""] * n, dtype=object)
    margin = c - r
    correct = margin > 0                                   # a tie is not a correct preference

    overall = accuracy_block(correct)
    report = {
        "accuracy": overall["accuracy"],
        "accuracy_ci95": overall["ci95"],
        "num_pairs": n,
        "loss": bt_loss(margin),
        "rewards": {"chosen": describe(c), "rejected": describe(r)},
        "margin": {
            **{k: v for k, v in describe(margin).items() if not k.startswith("p")},
            "unsure_threshold": unsure_threshold,
            "unsure_share": float((np.abs(margin) < unsure_threshold).mean()) if n else None,
        },
    }

    report["length"] = length_bias(c, r, lc, lr, correct)
    per_source = {}
    for s in sorted(set(sources.tolist())):
        sel = sources == s
        block = accuracy_block(correct[sel])
        per_source[s] = {**block, "margin_mean": float(margin[sel].mean()), "loss": bt_loss(margin[sel])}
    report["per_source"] = per_source
    return report


# ----------------------------------------------------------------------------------------------
# Scoring


def model_device(model) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def score_pairs(model, items, batch_size: int = 16, bf16: bool = False, progress: bool = True,
                share_prompt: bool = False):
    """Rewards of tokenised pairs: (chosen, rejected) numpy float64 arrays, in the order of `items`.

    Batches are formed by length (longest first: an out-of-memory batch size fails at once, not at the
    end), chosen and rejected of a batch in one forward pass as in training (share_prompt: each pair's
    prompt computed once, as train.py --share_prompt). The model runs in eval mode
    (no dropout) and is put back in the mode it was in, so train.py can call this mid-training.
    """
    from tqdm import tqdm
    from data import batch_order
    from support.packing import choose_collate
    collate = choose_collate(False, share_prompt)
    device = model_device(model)
    pad_id = model.tokenizer.pad_id
    chosen, rejected = np.zeros(len(items)), np.zeros(len(items))
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(items), desc="scoring", unit="pair", disable=not progress, leave=False) as bar:
            for idx in batch_order([it.length for it in items], batch_size, seed=0, shuffle=False):
                batch = collate([items[i] for i in idx], pad_id).to(device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    rewards = model(batch.input_ids, batch.attention_mask, batch.layout)
                rewards = rewards.float().cpu().numpy()  # the B chosen sequences first, then the B rejected
                chosen[idx], rejected[idx] = rewards[:len(idx)], rewards[len(idx):]
                bar.update(len(idx))
    finally:
        model.train(was_training)
    bad = int((~np.isfinite(chosen)).sum() + (~np.isfinite(rejected)).sum())
    if bad:
        raise UserError(f"the model gave {bad} non-finite reward(s) (NaN/inf): its weights have diverged"
                        f"{' or bf16 overflowed (drop --bf16)' if bf16 else ''}; evaluate another checkpoint")
    return chosen, rejected


def counts_from_stats(num_evaluated: int, stats) -> dict:
    """What happened to the rows: evaluated, skipped as bad rows (by reason), dropped as too long."""
    skipped = dict(sorted(stats.skipped.items())) if stats is not None else {}
    return {"evaluated": num_evaluated, "skipped": sum(skipped.values()), "skipped_reasons": skipped,
            "dropped_too_long": stats.dropped_too_long if stats is not None else 0,
            "truncated_prompt": stats.truncated_prompt if stats is not None else 0}


def prepare(model, pairs, max_length: int, stats=None):
    """Pairs (or ranked groups) -> (tokenised ones, stats). Tokenises with the model's tokenizer (those
    already tokenised, e.g. train.py's held-out set, are used as they are). Works on a COPY of stats:
    evaluating twice with the stats of one loading must not count the dropped pairs twice."""
    from data import DataStats, TokenizedPair, tokenize_pairs
    stats = copy.deepcopy(stats) if stats is not None else DataStats()
    if not pairs:
        raise UserError("no pairs to evaluate; check the evaluation data")
    if isinstance(pairs[0], (TokenizedPair, ranked.TokenizedGroup)):
        return list(pairs), stats
    if getattr(model, "tokenizer", None) is None:
        raise UserError("the model has no tokenizer; load it with RewardModel.from_pretrained from a directory "
                        "holding tokenizer.json, or set model.tokenizer")
    tokenize = ranked.tokenize_groups if isinstance(pairs[0], ranked.Group) else tokenize_pairs
    return tokenize(pairs, model.tokenizer, max_length, stats), stats


def evaluate(model, pairs, batch_size: int = 16, max_length: int = DEFAULT_MAX_LENGTH, bf16: bool = False,
             progress: bool = True, stats=None, unsure_threshold: float = 0.1, return_rewards: bool = False,
             share_prompt: bool = False, rewards_file=None):
    """Score preference pairs with a reward model and return the report (without the run information).

    pairs: data.Pair objects (tokenised here with model.tokenizer, too-long pairs dropped and counted)
    or data.TokenizedPair objects (used as they are). stats: the data.DataStats of loading, so that the
    skipped rows show in the report's counts; it is not modified. The model's train/eval mode is kept.
    return_rewards: also return the per-pair numbers, for plots: (report, (chosen, rejected, chosen_len,
    rejected_len)). share_prompt: compute each pair's prompt once (the same rewards, faster). Ranked groups
    (support/ranked.py): a "ranking" entry, every ordered pair as a pair, each group's rewards to rewards_file.
    """
    items, stats = prepare(model, pairs, max_length, stats)
    if not items:
        raise UserError(f"all {len(pairs)} pairs are longer than max_length {max_length} tokens; raise --max_length")
    if isinstance(items[0], ranked.TokenizedGroup):  # each group scored once, its prompt once with share_prompt
        ranking, (chosen, rejected, chosen_len, rejected_len, sources) = ranked.evaluate_groups(
            model, items, batch_size, bf16, share_prompt, wilson_interval, rewards_file)
    else:
        ranking, (chosen, rejected) = {}, score_pairs(model, items, batch_size=batch_size, bf16=bf16,
                                                     progress=progress, share_prompt=share_prompt)
        chosen_len, rejected_len = [it.chosen_response_len for it in items], [it.rejected_response_len for it in items]
        sources = [it.source for it in items]
    report = report_from_rewards(chosen, rejected, chosen_len, rejected_len, sources, unsure_threshold=unsure_threshold)
    report.update(ranking, counts=counts_from_stats(len(items), stats))
    return (report, (chosen, rejected, chosen_len, rejected_len)) if return_rewards else report


# ----------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    """eval.py's flags (support/cli.py), checked before any loading (validate.check_eval_args)."""
    return cli.parse_eval_command_line(argv, DEFAULT_DATASET, DEFAULT_MAX_LENGTH)


def main(argv=None):
    """`python eval.py CHECKPOINT [flags]`: evaluate() on the pairs the model is meant to be judged on, with
    what it was evaluated on; the report written (evaluation_report.json), then printed. Returns the report."""
    args = parse_args(argv)
    from support import tokenizer as tokenizer_files
    from rm import RewardModel

    # 1. The checkpoint: found, and checked to be a reward model, before anything is loaded.
    model_dir, report_dir = hub.find_model_dir(args.checkpoint)
    trained = validate.trained_settings(model_dir)
    output = report_files.report_path(args.output, report_dir)
    check_writable(output.parent, f"the report {output}", "choose another --output")  # now, not after scoring
    if args.benchmark:  # RewardBench, RewardBench 2 or RM-Bench from their files, instead of pairs
        return benchmarks.run(args, model_dir, trained, output)
    if args.save_reward_stats:
        scoring.check_stats_writable(model_dir)  # a read-only or full model directory: now, not after scoring

    # 2. The data (before the model: a wrong path should fail in a second, not after loading weights).
    # By default the model is evaluated on what it was trained on (test split) and at its training length.
    dataset = args.dataset or trained.get("eval_dataset") or trained.get("dataset") or DEFAULT_DATASET
    dataset = [dataset] if isinstance(dataset, str) else list(dataset)  # as recorded: a name may hold a comma
    max_length = args.max_length or trained.get("max_length") or DEFAULT_MAX_LENGTH
    share_prompt = args.share_prompt or bool(trained.get("share_prompt"))  # as in training: same rewards, faster
    tokenizer_files.require_file(model_dir)
    tokenizer = tokenizer_files.Tokenizer.from_dir(model_dir)  # its chat template renders conversational rows
    plan = heldout.plan_evaluation(dataset, args.split, args.dataset is not None, trained)
    pairs, stats = heldout.load_for_evaluation(plan, trained, args.max_samples, tokenizer.chat_format(
        args.chat_template), char_cap=tokenizer.char_cap(max_length))  # texts cut as read: bounded memory

    # 3. The model, then the scores.
    model = RewardModel.from_pretrained(str(model_dir), device=args.device)
    model.tokenizer = tokenizer
    report, rewards = evaluate(model, pairs, batch_size=args.batch_size, max_length=max_length, bf16=args.bf16,
                               progress=args.progress, stats=stats, unsure_threshold=args.unsure_threshold,
                               return_rewards=True, share_prompt=share_prompt,
                               rewards_file=output.parent / ranked.REWARDS_FILE)
    report.update(checkpoint=args.checkpoint, model_dir=str(model_dir), dataset=dataset, split=plan.split,
                  eval_fraction=plan.fraction, max_length=max_length, max_samples=args.max_samples, bf16=args.bf16,
                  share_prompt=share_prompt, chat_template=args.chat_template,
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if args.save_reward_stats:
        report["reward_stats"] = scoring.save_reward_stats(model_dir, report)

    # 4. Outputs: the report first (atomically: a failed run leaves no report), then the table and the plots.
    report_files.write_report(output, report)
    print(report_files.summary(report))
    print(f"report: {output}")
    if args.plots:
        for path in report_files.save_plots(Path(args.plots), *rewards):
            print(f"plot: {path}")
    return report


if __name__ == "__main__":
    run_cli(main)
