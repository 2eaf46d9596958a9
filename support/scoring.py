"""Using a trained reward model: best-of-N texts, reward normalisation, and a reward function for TRL.

RewardModel keeps thin methods (score, score_responses, reward_function, reward_stats) over these
(this module takes the model as an argument and never imports rm.py):
- `sequences`, `run_batches`: the ids of whole texts and the forward passes that score them.
- `joined`: the whole texts `score` scores for one prompt and its N responses (score_responses runs the
  prompt's tokens once for all of them: packing.collate_responses).
- Normalisation statistics, as OpenRLHF keeps them: the mean and std of held-out rewards (chosen and
  rejected together), saved in config.json. Ours live in the "reward_model" entry as
  `"reward_stats": {"mean", "std", "n"}`; the top-level `mean` and `std` keys are OpenRLHF's names (its
  `--normalize_reward` reads them), written too so the linear-head export normalises there the same way.
  transformers keeps unknown config keys as plain attributes and uses neither.
- `reward_function`: TRL GRPOTrainer's `reward_funcs` signature, f(prompts, completions, **kwargs).
"""
import math
import numbers
import sys
from pathlib import Path

import torch

from support.tokenizer import pad_rows
from support import packing
from support.errors import UserError, check_writable
from support.fileio import write_json_atomic
from support.hub import read_json

FLOAT32_MAX = 3.4028234663852886e38  # the largest reward a float32 forward can give
MIN_STD = 1e-8  # as OpenRLHF clamps it: constant rewards must not divide by zero


# ----------------------------------------------------------------------------------------------
# The public API's arguments, checked before any work: one error naming the argument and the fix, in
# Python terms. A str where a list belongs above all: it would be scored one character at a time.


def check_arguments(call: str, name: str, items, batch_size, max_length, normalize):
    """score(texts, ...) and score_responses(prompt, responses, ...): `items` (called `name`) a list of texts
    or conversations (responses: also single messages), batch_size >= 1, max_length None or >= 2, normalize
    True or False."""
    check_list(call, name, items)
    for i, item in enumerate(items):
        if name == "texts" and isinstance(item, dict):
            raise UserError(f"{call}: texts[{i}] is a message (a dict); a conversation is a list of messages, and "
                            f"texts a list of those: {call}([[{{\"role\": ..., \"content\": ...}}, ...]])")
        if not isinstance(item, (str, list, tuple, dict)):
            raise UserError(f"{call}: {name}[{i}] is {type(item).__name__}; each is a text (str) or a conversation "
                            f"(a list of {{\"role\", \"content\"}} messages)")
    if not is_whole(batch_size) or batch_size < 1:
        raise UserError(f"{call}: batch_size={batch_size!r} must be a whole number >= 1 (texts per forward pass)")
    if max_length is not None and (not is_whole(max_length) or max_length < 2):
        raise UserError(f"{call}: max_length={max_length!r} must be a whole number >= 2 (the tokens a text keeps, "
                        f"its end), or None for the model's own (scoring_length)")
    check_flag(call, "normalize", normalize)


def check_list(call: str, name: str, value):
    if isinstance(value, (str, bytes)):
        raise UserError(f"{call}: {name} is one {type(value).__name__}, not a list (it would be scored one character "
                        f"at a time); wrap it in a list: [{name[:-1]}]")
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{call}: {name} is {type(value).__name__}; pass a list of texts (str) or conversations "
                        f"(lists of {{\"role\", \"content\"}} messages)")


def check_flag(call: str, name: str, value):
    if not isinstance(value, bool):
        raise UserError(f"{call}: {name}={value!r} must be True or False")


def is_whole(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def joined(prompt, responses: list) -> list:
    """The whole texts of one prompt answered by each response: prompt + response for a string prompt (an
    hh-rlhf transcript ending in "\\n\\nAssistant:", or any text); for a conversation (a list of messages),
    its messages followed by the response as the assistant's turn (a string, one message, or a list of
    messages, as TRL passes completions)."""
    if isinstance(prompt, str):
        if not all(isinstance(r, str) for r in responses):
            raise UserError("a string prompt takes string responses; pass the prompt as a list of "
                            "{\"role\", \"content\"} messages to score assistant messages")
        return [prompt + r for r in responses]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise UserError(f"prompt is {type(prompt).__name__ if not isinstance(prompt, list) else 'a list of other things'}"
                        f"; a prompt is a string or a list of {{\"role\", \"content\"}} messages")
    texts = []
    for r in responses:
        if isinstance(r, str):
            r = [{"role": "assistant", "content": r}]
        elif isinstance(r, dict):
            r = [r]
        elif not isinstance(r, list) or not all(isinstance(m, dict) for m in r):
            raise UserError(f"a response to a conversation is a string, a message or a list of messages, "
                            f"not {type(r).__name__}")
        texts.append(prompt + r)
    return texts


def scoring_length(model, max_length: int | None = None) -> int:
    """THE rule for how many tokens of a text are scored, on every path (score, score_responses,
    reward_function, tools.serve, eval.py --benchmark), so that one model gives one reward: max_length when
    given; else the training max_length the model carries (config.json's "reward_model" entry: it never saw
    longer texts); else, for a model without one (a transformers classifier), its max_position_embeddings.
    A longer text keeps its END (the response), as training does."""
    if max_length is None:
        return model.provenance.get("max_length") or model.config.max_position_embeddings
    return max_length


def sequences(model, texts: list, max_length: int | None) -> list[list[int]]:
    """The ids score() runs for each text (Tokenizer.sequence), at most scoring_length(model, max_length) of
    them, the END kept."""
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer; load it with RewardModel.from_pretrained from a "
                        "directory holding tokenizer.json, or set model.tokenizer")
    if model.tokenizer.chat_template is None and any(not isinstance(t, str) for t in texts):
        raise UserError("score: conversations (lists of {\"role\", \"content\"} messages) need a chat template "
                        "and this model's tokenizer has none; give it one: model.tokenizer.chat_format(\"PATH\") "
                        "with a .jinja file (e.g. the instruct model's chat_template.jinja), or score whole texts")
    return [model.tokenizer.sequence(t, scoring_length(model, max_length)) for t in texts]


@torch.no_grad()
def run_batches(model, seqs: list, batches: list, normalize: bool, shared: bool = False) -> list[float]:
    """Rewards of token sequences, one forward per batch of indices into seqs: right-padded rows, or
    (shared) one prompt's sequences with their common prefix run once (packing.collate_responses). The
    model scores in eval mode and is put back in the mode it was in."""
    transform = normalizer(model.reward_stats, normalize)
    device, pad_id = next(model.parameters()).device, model.tokenizer.pad_id
    rewards, was_training = [0.0] * len(seqs), model.training
    model.eval()
    try:
        for idx in batches:
            rows = [seqs[i] for i in idx]
            if shared:
                (input_ids, layout), attention_mask = packing.collate_responses(rows, pad_id), None
                layout = layout.to(device)
            else:
                (input_ids, attention_mask), layout = pad_rows(rows, pad_id), None
                attention_mask = attention_mask.to(device)
            for i, reward in zip(idx, model(input_ids.to(device), attention_mask, layout).tolist()):
                rewards[i] = reward
    finally:
        model.train(was_training)
    return transform(rewards)


def runs(prompts: list) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive equal prompts (GRPO's group of completions of one prompt)."""
    bounds, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            bounds.append((start, i))
            start = i
    return bounds


def reward_function(model, normalize: bool = False):
    """f(prompts, completions, **kwargs) -> one reward per completion, for TRL GRPOTrainer(reward_funcs=[f]).
    Strings or conversations. A run of equal consecutive prompts (GRPO lists each prompt's completions
    together) is scored with score_responses, its prompt computed once; lone prompts are batched in score."""
    check_flag("reward_function", "normalize", normalize)
    normalizer(model.reward_stats, normalize)  # no statistics: fail now, not at the first training step

    def reward(prompts: list, completions: list, **kwargs) -> list[float]:
        check_list("reward_function()(prompts, completions)", "prompts", prompts)
        check_list("reward_function()(prompts, completions)", "completions", completions)
        if len(prompts) != len(completions):
            raise UserError(f"{len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion")
        rewards, lone = [0.0] * len(prompts), []
        for start, end in runs(prompts):
            if end - start > 1:
                rewards[start:end] = model.score_responses(prompts[start], completions[start:end], normalize=normalize)
            else:
                lone.append(start)
        texts = [joined(prompts[i], [completions[i]])[0] for i in lone]
        for i, r in zip(lone, model.score(texts, normalize=normalize) if texts else []):
            rewards[i] = r
        return rewards
    return reward


# ----------------------------------------------------------------------------------------------
# Normalisation statistics


def valid_stats(stats) -> bool:
    """Whether a saved "reward_stats" entry is usable: finite mean, std > 0 with (r - mean) / std finite for
    every float32 reward r (a std of 5e-324 is not), n a whole number."""
    # abs(x) <= float max, not math.isfinite: a JSON integer such as 10**400 overflows a float (OverflowError)
    return (isinstance(stats, dict) and all(type(stats.get(k)) in (int, float) for k in ("mean", "std"))
            and abs(stats["mean"]) <= sys.float_info.max and sys.float_info.max >= stats["std"] > 0
            and math.isfinite((abs(stats["mean"]) + FLOAT32_MAX) / stats["std"])  # (r - mean) / std of any reward
            and type(stats.get("n")) is int and stats["n"] >= 2)


def stats_of(rewards) -> dict:
    """{"mean", "std", "n"} of rewards: std with Bessel's correction and clamped at MIN_STD, as OpenRLHF's."""
    n = len(rewards)
    mean = sum(rewards) / n
    var = sum((r - mean) ** 2 for r in rewards) / (n - 1)
    return {"mean": mean, "std": max(math.sqrt(var), MIN_STD), "n": n}


def stats_from_report(report: dict) -> dict:
    """The statistics of all 2n rewards of an evaluation report, from its chosen and rejected blocks (n each,
    population stds): pooled mean and variance, then Bessel's correction, exactly as stats_of would give."""
    n, c, r = report["num_pairs"], report["rewards"]["chosen"], report["rewards"]["rejected"]
    mean = (c["mean"] + r["mean"]) / 2
    population_var = (c["std"] ** 2 + r["std"] ** 2) / 2 + ((c["mean"] - r["mean"]) / 2) ** 2
    return {"mean": mean, "std": max(math.sqrt(population_var * 2 * n / (2 * n - 1)), MIN_STD), "n": 2 * n}


def normalizer(stats: dict | None, normalize: bool):
    """rewards -> rewards: (r - mean) / std when normalize, else unchanged. A UserError when asked without
    statistics (checked before any scoring)."""
    if not normalize:
        return lambda rewards: rewards
    if stats is None:
        raise UserError("normalize=True needs the reward mean and std in the model's config.json and it has "
                        "none; save them with python eval.py MODEL --save_reward_stats (train.py saves them "
                        "after evaluating held-out pairs)")
    mean, std = stats["mean"], stats["std"]
    return lambda rewards: [(r - mean) / std for r in rewards]


def config_keys(stats: dict | None) -> dict:
    """The top-level config.json keys OpenRLHF reads (`mean`, `std`), or none."""
    return {} if stats is None else {"mean": stats["mean"], "std": stats["std"]}


def check_stats_writable(model_dir: Path):
    """That save_reward_stats can write the model's config.json: a plain file (not a Hub cache link) in a
    directory that takes a file (not read-only, not full); eval.py checks it before scoring."""
    path = Path(model_dir) / "config.json"
    if path.is_symlink() or not path.is_file():
        raise UserError(f"{path} is not a plain file (a Hub cache entry?); the reward statistics are written "
                        f"into the model's own directory: download it there first (huggingface-cli download "
                        f"REPO --local-dir DIR) and evaluate DIR")
    check_writable(Path(model_dir), f"the reward statistics into {path}",
                   "evaluate a copy of the model in a writable directory, or drop --save_reward_stats")


def save_reward_stats(model_dir: Path, report: dict) -> dict:
    """Write the statistics of an evaluation report's rewards into a saved model's config.json (replaced
    atomically) and return them. A Hub download's config.json (a symlink into the cache) is refused."""
    check_stats_writable(model_dir)
    path = Path(model_dir) / "config.json"
    stats = stats_from_report(report)
    config = read_json(path, "a model directory must hold config.json")
    entry = config.get("reward_model") or {"head": "linear", "pooling": "last"}  # a transformers classifier
    config.update(reward_model={**entry, "reward_stats": stats}, **config_keys(stats))
    try:
        write_json_atomic(path, config)
    except OSError as e:  # the disk filled up or went read-only while scoring: config.json is as it was
        raise UserError(f"cannot write the reward statistics into {path} ({e.strerror}); free space, or drop "
                        "--save_reward_stats") from None
    return stats
