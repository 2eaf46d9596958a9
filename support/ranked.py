"""Ranked data: K responses to one prompt with scores or ranks (UltraFeedback, Nectar, plain ranked rows),
read into groups, binarised into pairs, tokenised, batched with each prompt run once, and scored.

- Layouts, recognised by their columns (readers.RANKED_LAYOUTS):
  UltraFeedback `instruction` + `completions` [{response, overall_score, ...}] (the instruction is a user
  turn: rendered with the chat template when there is one, else the hh-rlhf transcript
  "\\n\\nHuman: " + instruction + "\\n\\nAssistant:" followed by " " + response);
  Nectar `prompt` (an hh-rlhf transcript) + `answers` [{answer, model, rank}], rank 1 the best;
  plain `prompt` + `responses` (strings, or conversations) + `scores` (higher is better) or `ranks` (1 is best).
  A plain or Nectar response is joined to its prompt as a pair's is (data.make_pair), so a K = 2 row is the
  same pair. A pair row (data.make_pair) is a group of two, levels [1, 0].
- Levels are higher-is-better: a score as given, a rank r as -r. Equal levels are ties, kept as ties.
- A bad row is skipped whole and counted with its reason (data.DataStats): "empty field", "not a string",
  "bad score" / "bad rank" (not a finite number), "mismatched lengths", "single response", "duplicate
  responses" (even with different scores), "empty response", "fewer than two levels".
- The held-out share holds out whole groups (group_key: a pair's key for a group of two).
- Tokenised as pairs are (data.tokenize_pairs): prompt + response whole, eos appended, the prompt cut from
  the left to fit max_length; a response that alone does not fit is dropped (counted in
  dropped_responses), and a group left with fewer than two levels is dropped (dropped_too_long).
- collate_groups: B groups -> one GroupBatch; with share_prompt each group's prompt runs once
  (packing.share_groups), padded or packed.
"""
import bisect
import hashlib
import json
import math
import random
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

import data
from support import demo, packing, readers
from support.errors import UserError
from support.fileio import write_text_atomic
from support.tokenizer import pad_rows

PAIRS_FROM_RANKED = ("best_vs_random", "best_vs_worst", "all")
REWARDS_FILE = "ranking_rewards.jsonl"  # eval.py writes every group's rewards there, next to the report
RANKED_COLUMNS = {c for layout in readers.RANKED_LAYOUTS for c in layout} - {"prompt"}


@dataclass
class Group:
    """One prompt and K >= 2 responses (texts after the prompt), each with a level (higher is better)."""
    prompt: str
    responses: list
    levels: list
    source: str = ""
    eos: bool = True      # as data.Pair.eos: False for chat-template renderings
    margin: float | None = None  # only a pair row's, for --loss pairwise
    key_hash: bytes | None = None  # group_hash of the whole texts, kept once they are cut as read (cut_group)


def is_ranked_row(row: dict) -> bool:
    return "chosen" not in row and any(c in row for c in RANKED_COLUMNS)


# -----------------------------------------------------------------------------
# Rows -> Group

def number(value) -> float | None:
    """A finite score or rank (ints allowed, bools not), or None."""
    if type(value) not in (int, float) or not math.isfinite(value):
        return None
    return float(value)


def row_fields(row: dict):
    """(prompt, responses, values, "score"|"rank", is UltraFeedback) of a ranked row, or a Skip."""
    if "completions" in row or "answers" in row:
        uf = "completions" in row
        prompt = row.get("instruction" if uf else "prompt")
        items = row.get("completions" if uf else "answers")
        if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
            return readers.Skip("empty field")
        text, value = ("response", "overall_score") if uf else ("answer", "rank")
        return prompt, [c.get(text) for c in items], [c.get(value) for c in items], ("score" if uf else "rank"), uf
    kind = "score" if "scores" in row else "rank"
    responses, values = row.get("responses"), row.get(kind + "s")
    if not isinstance(responses, list) or not isinstance(values, list):
        return readers.Skip("empty field")
    return row.get("prompt"), responses, values, kind, False


def make_group(row: dict, source: str, chat_format=None) -> Group | readers.Skip:
    """One row -> Group, or Skip(reason). A pair row becomes the group (chosen, rejected) with levels [1, 0]."""
    if not is_ranked_row(row):
        pair = data.make_pair(row, source, chat_format)
        return pair if isinstance(pair, readers.Skip) else \
            Group(pair.prompt, [pair.chosen, pair.rejected], [1.0, 0.0], source, pair.eos, pair.margin)
    fields = row_fields(row)
    if isinstance(fields, readers.Skip):
        return fields
    prompt, responses, values, kind, uf = fields
    if len(responses) != len(values):
        return readers.Skip("mismatched lengths")
    if len(responses) < 2:
        return readers.Skip("single response")
    levels = [number(v) for v in values]
    if any(v is None for v in levels):
        return readers.Skip(f"bad {kind}")
    levels = levels if kind == "score" else [-v for v in levels]
    if prompt is None or any(r is None for r in responses):
        return readers.Skip("empty field")
    if isinstance(prompt, list) or any(isinstance(r, list) for r in responses):
        return conversation_group(prompt, responses, levels, source, chat_format)
    if not isinstance(prompt, str) or not all(isinstance(r, str) for r in responses):
        return readers.Skip("not a string")
    if not prompt.strip() or not all(r.strip() for r in responses):
        return readers.Skip("empty field")
    if len(set(responses)) < len(responses):
        return readers.Skip("duplicate responses")
    if len(set(levels)) < 2:
        return readers.Skip("fewer than two levels")
    if uf and chat_format is not None and chat_format.template is not None:
        answers = [[{"role": "assistant", "content": r}] for r in responses]
        return conversation_group([{"role": "user", "content": prompt}], answers, levels, source, chat_format)
    if uf:
        prompt, responses = "\n\nHuman: " + prompt + readers.ASSISTANT, [" " + r for r in responses]
    elif all(r.startswith(prompt) for r in responses):  # whole texts lose the prompt, as a pair's do
        responses = [r[len(prompt):] for r in responses]
    if not all(r.strip() for r in responses):
        return readers.Skip("empty response")
    return Group(prompt, responses, levels, source)


def conversation_group(prompt, responses: list, levels: list, source: str, chat_format) -> Group | readers.Skip:
    """Conversations rendered with the chat template as pairs are (chat.ChatFormat.pair of the first response
    with each other one); the prompt text is the shortest of those pairs' prompts, a prefix of every rendering."""
    if chat_format is None:
        from support import chat
        chat_format = chat.ChatFormat(None, why_none="no chat template was given")
    if len(set(map(repr, responses))) < len(responses):
        return readers.Skip("duplicate responses")
    if len(set(levels)) < 2:
        return readers.Skip("fewer than two levels")
    texts = [chat_format.pair(prompt, responses[0], r, source) for r in responses[1:]]
    if (reason := next((t for t in texts if isinstance(t, str)), None)) is not None:
        return readers.Skip("duplicate responses" if reason == "chosen == rejected" else reason)
    head = min((t[0] for t in texts), key=len)
    whole = [texts[0][0] + texts[0][1]] + [p + r for p, _, r in texts]
    return Group(head, [w[len(head):] for w in whole], levels, source, eos=False)


# -----------------------------------------------------------------------------
# Sources -> groups; the held-out share; pairs from groups

def demo_or_files(source: str, split: str):
    """(names, fetch, read) of a source, as data.iter_pairs finds them (data.source_rows); demo_ranked is
    generated."""
    if source != "demo_ranked":
        return data.source_rows(source, split)
    if split not in demo.DEMO_SIZES:
        raise UserError(f"{source}: no '{split}' split; available splits: {', '.join(demo.DEMO_SIZES)}")
    return [split], (lambda name: name), demo.demo_ranked_rows


def is_ranked(sources: list, split: str = "train") -> bool:
    """Whether any source holds ranked rows (its first row's columns say; a Hub file is fetched for it)."""
    for source in sources:
        names, fetch, read = demo_or_files(source, split)
        first = next((row for name in names[:1] for row in read(fetch(name)) if isinstance(row, dict)), None)
        if first is not None and is_ranked_row(first):
            return True
    return False


def iter_groups(source: str, split: str, stats: data.DataStats, chat_format=None, char_cap: int | None = None):
    names, fetch, read = demo_or_files(source, split)
    for name in names:
        for row in read(fetch(name)):
            result = row if isinstance(row, readers.Skip) else make_group(row, source, chat_format)
            stats.count(result)
            if isinstance(result, Group):
                yield cut_group(result, char_cap) if char_cap else result


def cut_group(group: Group, cap: int) -> Group:
    """data.cut_texts for a group: as it is read, the prompt keeps its last `cap` characters and a response
    over `cap` (dropped when tokenised) its first cap + 1, so memory is bounded by what max_length can use and
    tokenize_groups makes the same ids; the held-out split, binarising and the digest hash the whole texts."""
    if max(len(group.prompt), *map(len, group.responses)) <= cap:
        return group
    return replace(group, prompt=group.prompt[-cap:], responses=[r[:cap + 1] for r in group.responses],
                   key_hash=group_hash(group))


def load_groups(sources: list, split: str = "train", max_samples: int | None = None,
                stats: data.DataStats | None = None, chat_format=None, char_cap: int | None = None) -> list[Group]:
    """Groups of one or several sources, round-robin as data.load_pairs; max_samples counts groups; char_cap
    cuts each group's texts as they are read (cut_group)."""
    stats = stats if stats is not None else data.DataStats()
    active, groups = [iter_groups(s, split, stats, chat_format, char_cap) for s in sources], []
    while active and (max_samples is None or len(groups) < max_samples):
        for it in list(active):
            if (group := next(it, None)) is None:
                active.remove(it)
            elif max_samples is None or len(groups) < max_samples:
                groups.append(group)
    if not groups:
        raise UserError(f"no usable groups in {', '.join(sources)} ({split}): {stats.read} rows read, skipped "
                        f"{stats.skipped}; check the data")
    return groups


def group_key(group: Group) -> bytes:
    """A group's texts in row order (a group of two from a pair row: the pair's data.pair_key)."""
    return "\0".join((group.prompt, *map(str, group.responses))).encode("utf-8", "surrogatepass")


def group_hash(group: Group) -> bytes:
    """8 bytes of hash of the group's whole texts, also once they were cut as read (kept in key_hash)."""
    return group.key_hash or hashlib.blake2b(group_key(group), digest_size=8).digest()


def split_held_out(groups: list[Group], fraction: float) -> tuple[list[Group], list[Group]]:
    """(training groups, held-out groups) by the hash of each group's content, as data.is_held_out: whole
    groups, never part of one."""
    held = [int.from_bytes(group_hash(g), "big") / 2**64 < fraction for g in groups]
    return [g for g, h in zip(groups, held) if not h], [g for g, h in zip(groups, held) if h]


def groups_digest(groups: list[Group]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for group in groups:  # the whole texts' hash, whether they were cut as read or not
        h.update(group_hash(group) + repr(group.levels).encode() + b"\0")
    return h.hexdigest()


def binarise(groups: list[Group], rule: str, seed: int) -> list[data.Pair]:
    """Pairs from groups (--pairs_from_ranked): best_vs_random, a best response against a random worse one
    (ultrafeedback_binarized's recipe); best_vs_worst; all, every strictly ordered pair in row order. Ties
    among the best (or the worst) are broken at random, never by position; the random choices are seeded by
    `seed` and the group's content, so they do not depend on the other groups."""
    pairs = []
    for g in groups:
        if rule == "all":
            pairs += [data.Pair(g.prompt, g.responses[i], g.responses[j], g.margin, g.source, g.eos)
                      for i in range(len(g.levels)) for j in range(len(g.levels)) if g.levels[i] > g.levels[j]]
            continue
        rng = random.Random(f"{seed}/" + group_hash(g).hex())
        top, bottom = max(g.levels), min(g.levels)
        best = rng.choice([i for i, v in enumerate(g.levels) if v == top])
        worse = [i for i, v in enumerate(g.levels) if (v == bottom if rule == "best_vs_worst" else v < top)]
        pairs.append(data.Pair(g.prompt, g.responses[best], g.responses[rng.choice(worse)], g.margin, g.source, g.eos))
    return pairs


def training_items(groups: list[Group], cfg, tok, stats) -> list:
    """train.py's items from ranked groups: with --loss pairwise the pairs --pairs_from_ranked takes from each
    group (default best_vs_random), tokenised as pairs; else the groups. A margin column (pair rows) applies to
    --loss pairwise only."""
    if cfg.loss == "pairwise":
        pairs = binarise(groups, cfg.pairs_from_ranked or "best_vs_random", cfg.seed)
        return data.tokenize_pairs(pairs, tok, cfg.max_length, stats)
    if any(g.margin is not None for g in groups):
        raise UserError(f"the data has a margin column, which --loss {cfg.loss} does not use (it orders responses, "
                        "with no target margin); drop the column or train with --loss pairwise")
    return tokenize_groups(groups, tok, cfg.max_length, stats)


# -----------------------------------------------------------------------------
# Group -> TokenizedGroup

@dataclass
class TokenizedGroup:
    ids: list              # K lists: kept prompt + response (+ eos), in the row's order
    levels: list           # (K,) higher is better
    source: str
    prompt_len: int        # prompt tokens kept (the same in all)
    response_lens: list    # response tokens, without an appended eos

    @property
    def length(self) -> int:
        """The padded length this group needs in a batch."""
        return max(map(len, self.ids))

    @property
    def tokens(self) -> int:
        """Its tokens, the prompt counted once per response (as a pair's chosen + rejected)."""
        return sum(map(len, self.ids))


def keep_responses(group: Group, keep: list, stats) -> Group | None:
    """The group with only the responses `keep` says (the others counted as dropped), None when fewer than
    two levels remain (counted as dropped_too_long)."""
    stats.dropped_responses += keep.count(False)
    if len({v for v, k in zip(group.levels, keep) if k}) < 2:
        stats.dropped_too_long += 1
        return None
    return replace(group, responses=[r for r, k in zip(group.responses, keep) if k],
                   levels=[v for v, k in zip(group.levels, keep) if k])


def tokenize_group(group: Group, encodings: list, tok, max_length: int, stats) -> TokenizedGroup | None:
    """As data.split_at_response and data.truncate_pair, for K responses: the prompt's tokens end within its
    characters and are the same in all K, and are cut from the left to fit."""
    n = min(bisect.bisect_right(e.offsets, len(group.prompt), key=lambda o: o[1]) for e in encodings)
    first = encodings[0].ids
    n = min(packing.shared_prefix_len(first[:n], e.ids[:n]) for e in encodings)
    prompt, responses = first[:n], [e.ids[n:] for e in encodings]
    ends = [tok.eos_suffix(e.ids) if group.eos else [] for e in encodings]
    fits = [len(r) + len(end) <= max_length for r, end in zip(responses, ends)]
    if not all(fits) and keep_responses(group, fits, stats) is None:
        return None
    levels = [v for v, f in zip(group.levels, fits) if f]
    responses, ends = [r for r, f in zip(responses, fits) if f], [e for e, f in zip(ends, fits) if f]
    longest = max(len(r) + len(e) for r, e in zip(responses, ends))
    keep = min(len(prompt), max_length - longest)
    if keep < len(prompt):
        stats.truncated_prompt += 1
    prompt = prompt[len(prompt) - keep:]                    # cut from the left: keep the question's end
    stats.tokenized += 1
    return TokenizedGroup([prompt + r + e for r, e in zip(responses, ends)], levels, group.source,
                          len(prompt), [len(r) for r in responses])


def tokenize_groups(groups: list[Group], tok, max_length: int, stats=None) -> list[TokenizedGroup]:
    """Groups -> token ids as data.tokenize_pairs makes them, encoded in batches (a response over the
    tokenizer's character cap cannot fit: dropped untokenised; a longer prompt keeps its last characters)."""
    if max_length < 2:
        raise UserError(f"max_length {max_length} is too small; use at least 2 (one token + eos)")
    stats = stats if stats is not None else data.DataStats()
    cap, out = tok.char_cap(max_length), []
    capped = [g if all(len(r) <= cap for r in g.responses) else keep_responses(g, [len(r) <= cap for r in g.responses],
                                                                               stats) for g in groups]
    capped = [replace(g, prompt=g.prompt[-cap:]) for g in capped if g is not None]
    for start in range(0, len(capped), data.ENCODE_CHUNK):
        chunk = capped[start:start + data.ENCODE_CHUNK]
        encodings, k = tok.encode_batch([g.prompt + r for g in chunk for r in g.responses]), 0
        for group in chunk:
            item = tokenize_group(group, encodings[k:k + len(group.responses)], tok, max_length, stats)
            k += len(group.responses)
            if item is not None:
                out.append(item)
    return out


# -----------------------------------------------------------------------------
# TokenizedGroup -> GroupBatch

@dataclass
class GroupBatch:
    """B groups' N = sum(K) sequences in one forward, in group order; group (N,) says which group each is in,
    level (N,) its level. Padded (input_ids/attention_mask (N, T)) or a packing.Layout (packed and/or shared
    prompts), as data.Batch."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    layout: object
    group: torch.Tensor
    level: torch.Tensor
    num_groups: int
    margin: None = None

    def to(self, device) -> "GroupBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       layout=None if self.layout is None else self.layout.to(device), group=move(self.group),
                       level=move(self.level))

    def num_tokens(self) -> torch.Tensor:
        """Real tokens in the N sequences (a shared prompt counted in each), as data.Batch.num_tokens."""
        return self.attention_mask.sum() if self.layout is None else (self.layout.sequence_ids >= 0).sum()


def collate_groups(items: list[TokenizedGroup], pad_id: int, packed: bool = False,
                   share_prompt: bool = False) -> GroupBatch:
    """B groups -> one GroupBatch: padded rows, packed rows (packed), and/or each group's prompt run once
    (share_prompt: packing.share_groups)."""
    seqs = [ids for it in items for ids in it.ids]
    sizes = [len(it.ids) for it in items]
    starts = np.cumsum([0] + sizes).tolist()
    group = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(sizes))
    level = torch.tensor([v for it in items for v in it.levels], dtype=torch.float32)
    attention_mask = layout = None
    if share_prompt:
        groups = [list(range(a, b)) for a, b in zip(starts, starts[1:])]
        input_ids, layout = packing.share_groups(seqs, groups, pad_id, packed)
    elif packed:
        input_ids, layout, _ = packing.pack_rows(seqs, pad_id)
    else:
        input_ids, attention_mask = pad_rows(seqs, pad_id)
    return GroupBatch(input_ids, attention_mask, layout, group, level, len(items))


def choose_collate(packed: bool, share_prompt: bool):
    """The collate function `(items, pad_id) -> GroupBatch` for train.py's / eval.py's flags."""
    return partial(collate_groups, packed=packed, share_prompt=share_prompt)


# -----------------------------------------------------------------------------
# Scoring groups, and the ranking metrics of eval.py's "ranking" entry

@torch.no_grad()
def score_groups(model, items: list[TokenizedGroup], batch_size: int = 16, bf16: bool = False,
                 share_prompt: bool = False) -> list[list[float]]:
    """Each group's rewards in its row order; batch_size counts groups, longest first (eval.score_pairs)."""
    device, was_training = next(model.parameters()).device, model.training
    collate, rewards = choose_collate(False, share_prompt), [None] * len(items)
    model.eval()
    try:
        for idx in data.batch_order([it.tokens for it in items], batch_size, seed=0, shuffle=False):
            batch = collate([items[i] for i in idx], model.tokenizer.pad_id).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(batch.input_ids, batch.attention_mask, batch.layout).float().cpu().tolist()
            for i in idx:
                rewards[i], out = out[:len(items[i].ids)], out[len(items[i].ids):]
    finally:
        model.train(was_training)
    if not all(math.isfinite(r) for group in rewards for r in group):
        raise UserError("the model gave non-finite rewards (NaN/inf): its weights have diverged"
                        f"{' or bf16 overflowed (drop --bf16)' if bf16 else ''}; evaluate another checkpoint")
    return rewards


def ordered_pairs(items: list[TokenizedGroup], rewards: list) -> tuple:
    """Every strictly ordered pair of every group as (chosen, rejected, chosen_len, rejected_len, sources)
    arrays: the pairs eval.report_from_rewards reports on."""
    rows = [(r[i], r[j], it.response_lens[i], it.response_lens[j], it.source)
            for it, r in zip(items, rewards) for i in range(len(r)) for j in range(len(r))
            if it.levels[i] > it.levels[j]]
    return tuple(np.asarray(col) for col in zip(*rows))


def kendall_tau_b(x, y) -> float | None:
    """(C - D) / sqrt((n0 - n1)(n0 - n2)): n0 pairs, n1 / n2 pairs tied in x / in y; None when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    upper = np.triu(np.ones((x.size, x.size), dtype=bool), 1)
    sx, sy = np.sign(x[:, None] - x[None, :])[upper], np.sign(y[:, None] - y[None, :])[upper]
    denom = math.sqrt(float((sx != 0).sum()) * float((sy != 0).sum()))  # n0 - n1 = pairs not tied in x
    return float((sx * sy).sum()) / denom if denom else None


def ranking_report(rewards: list, levels: list, interval) -> dict:
    """eval.py's "ranking" entry from each group's rewards and levels (higher is better), in any order:

    - pairwise_accuracy: over all pairs (i, j) of a group with level_i > level_j, the share with
      reward_i > reward_j strictly (a tie is wrong); `pairs` is their number; `interval(correct, pairs)`
      (Wilson) gives pairwise_accuracy_ci95.
    - top1_accuracy: per group, among the responses whose reward is the group's maximum, the share that have
      the best level (RewardBench 2's 1/k tie rule); the mean over groups.
    - kendall_tau: per group, Kendall's tau-b of rewards and levels; the mean over groups where it is defined
      (None if none)."""
    correct = pairs = 0
    top1, taus = [], []
    for r, v in zip(rewards, levels):
        r, v = np.asarray(r, dtype=np.float64), np.asarray(v, dtype=np.float64)
        better = v[:, None] > v[None, :]
        pairs += int(better.sum())
        correct += int((better & (r[:, None] > r[None, :])).sum())
        at_max = r == r.max()
        top1.append(float((at_max & (v == v.max())).sum() / at_max.sum()))
        taus.append(kendall_tau_b(r, v))
    defined = [t for t in taus if t is not None]
    return {"pairwise_accuracy": correct / pairs if pairs else None,
            "pairwise_accuracy_ci95": list(interval(correct, pairs)),
            "top1_accuracy": float(np.mean(top1)) if top1 else None,
            "kendall_tau": float(np.mean(defined)) if defined else None,
            "groups": len(rewards), "pairs": pairs}


def evaluate_groups(model, items: list[TokenizedGroup], batch_size: int, bf16: bool, share_prompt: bool, interval,
                    rewards_file=None) -> tuple[dict, tuple]:
    """eval.evaluate's part for ranked groups: each group scored once; returns ({"ranking": ranking_report}, the
    ordered pairs for eval.report_from_rewards). rewards_file (ranking_rewards.jsonl): one line per group,
    {"rewards": [...], "levels": [...]} in the row's order (a response dropped as too long is not there)."""
    rewards = score_groups(model, items, batch_size, bf16, share_prompt)
    entry = {"ranking": ranking_report(rewards, [it.levels for it in items], interval)}
    if rewards_file is not None:
        write_text_atomic(rewards_file, "".join(json.dumps({"rewards": r, "levels": it.levels}) + "\n"
                                                for r, it in zip(rewards, items)))
        entry["ranking_rewards_file"] = str(rewards_file)
    return entry, ordered_pairs(items, rewards)
