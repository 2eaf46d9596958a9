"""Preference data, top to bottom: rows -> Pair -> TokenizedPair -> Batch.

- Sources (iter_pairs, load_pairs): "demo" (support/demo.py, generated offline), a local .parquet,
  .jsonl, .jsonl.gz or .json file, directory or glob, or a Hub dataset id such as Anthropic/hh-rlhf
  (support/hub.py finds the files). support/readers.py streams a file's rows with their memory bounded
  (a row over readers.MAX_ROW_BYTES is skipped as "row too large"); a text longer than max_length
  tokens can be (Tokenizer.char_cap) is never handed to the tokenizer, and given char_cap, it is cut as
  the row is read (cut_texts), so the pairs kept hold at most what they can use.
- Rows -> Pair: prompt/chosen/rejected columns are taken as given (chosen and rejected that both begin
  with the prompt lose it); chosen/rejected alone are whole hh-rlhf transcripts, split after the last
  "\\n\\nAssistant:" they share. Conversational rows (lists of {"role", "content"} messages) are rendered
  with the model's chat template (support/chat.py). A `margin` column is carried. A bad row is skipped
  with its reason and counted: read == kept + sum(skipped). Wrong columns, a missing, unsupported or
  corrupt file are UserErrors naming the path.
- Pair -> TokenizedPair: the joined text prompt + response is tokenised whole (the ids transformers and
  TRL see), split at the response's first character, eos appended (see Tokenizer.eos_suffix in
  support/tokenizer.py; none for a rendered conversation); max_length cuts the prompt from the LEFT and
  never a response (a pair whose response alone does not fit is dropped and counted).
- TokenizedPair -> Batch: batch_order groups similar lengths; collate pads the B chosen rows, then the
  B rejected ones, so one forward pass scores both (support/packing.py lays them out without padding).
- The held-out share of a source is a pure function of each pair's content (is_held_out).
- `python -m tools.inspect_data SOURCE` streams a source and prints the counts and the peak memory growth.
"""
import bisect
import hashlib
import math
import os
import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator

import torch

from support import demo, hub, readers, tokenizer
from support.errors import UserError

if TYPE_CHECKING:  # for the annotations only: chat (and jinja2) load with the first conversational row
    from support import chat

ENCODE_CHUNK = 1024           # pairs the tokenizer encodes in one call (it runs them in parallel)


# -----------------------------------------------------------------------------
# Pairs, skipped rows and the counters

@dataclass
class Pair:
    """One preference: the same prompt answered twice. chosen/rejected are the responses only."""
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    source: str = ""  # "Anthropic/hh-rlhf", "demo", or the local path as given
    eos: bool = True  # end each text with the eos token; False for chat-template renderings (as TRL)
    cut_to: int = 0   # the characters the texts were cut to as they were read (cut_texts); 0: whole
    key_hash: bytes | None = None  # content_hash of the whole texts, kept when they were cut


@dataclass
class DataStats:
    """What happened to every row, so that nothing is lost without a count (ranked groups count as pairs do)."""
    read: int = 0                                            # rows (or jsonl lines) read
    kept: int = 0                                            # rows that became a Pair
    skipped: dict[str, int] = field(default_factory=dict)    # reason -> rows
    sources: dict[str, int] = field(default_factory=dict)    # source -> pairs kept
    tokenized: int = 0                                       # pairs that fit max_length
    truncated_prompt: int = 0                                # ... of which the prompt was cut
    dropped_too_long: int = 0                                # pairs whose response alone did not fit
    dropped_responses: int = 0                               # ranked groups' responses that alone did not fit

    def count(self, row: "Pair | readers.Skip"):
        """One row read: kept (a Pair, or a ranked group), or skipped with its reason."""
        self.read += 1
        if isinstance(row, readers.Skip):
            self.skipped[row.reason] = self.skipped.get(row.reason, 0) + 1
        else:
            self.kept += 1
            self.sources[row.source] = self.sources.get(row.source, 0) + 1

    @classmethod
    def of_pairs(cls, pairs: list["Pair"]) -> "DataStats":
        """The counts of pairs taken as they are (a held-out share): each one read and kept."""
        sources = {}
        for pair in pairs:
            sources[pair.source] = sources.get(pair.source, 0) + 1
        return cls(read=len(pairs), kept=len(pairs), sources=sources)

    def report(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "skipped_total": sum(self.skipped.values()), "sources": dict(self.sources),
                "tokenized": self.tokenized, "truncated_prompt": self.truncated_prompt,
                "dropped_too_long": self.dropped_too_long, "dropped_responses": self.dropped_responses}


# -----------------------------------------------------------------------------
# Rows -> Pair

def common_prefix_len(a: str, b: str) -> int:
    # binary search with slice compares: runs in C, unlike a Python loop over characters
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """hh-rlhf: two whole transcripts -> (shared prompt, chosen response, rejected response).

    The prompt ends just after the last "\\n\\nAssistant:" inside the common prefix; None when there is
    none. When the transcripts differ before their last turn, the responses hold several turns."""
    cut = chosen.rfind(readers.ASSISTANT, 0, common_prefix_len(chosen, rejected))
    if cut < 0:
        return None
    cut += len(readers.ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_margin(value) -> float | None:
    """None when there is none; nan when it is not a number that fits float32 (inf would make the loss inf)."""
    if value is None:
        return None
    try:
        margin = float(value)
    except (TypeError, ValueError):
        return math.nan
    return margin if math.isfinite(margin) and abs(margin) <= 3.4e38 else math.nan


def make_pair(row: dict, source: str, chat_format: "chat.ChatFormat | None" = None) -> Pair | readers.Skip:
    """One row of a file's layout ("prompt" among its keys or not decides which) -> Pair, or Skip(reason).

    With a prompt column, whole texts (chosen and rejected both starting with the prompt) lose it. A row
    whose chosen or rejected is a list is a conversation: see conversation_pair."""
    if "chosen" not in row and "rejected" not in row:  # a ranked row (support/ranked.py) in a file of pairs
        return readers.Skip("ranked row among pairs")
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        return conversation_pair(row, source, chat_format)
    texts = [row[k] for k in ("prompt", "chosen", "rejected") if k in row]
    if any(t is None for t in texts):
        return readers.Skip("empty field")
    if any(not isinstance(t, str) for t in texts):
        return readers.Skip("not a string")
    if any(not t.strip() for t in texts):
        return readers.Skip("empty field")
    margin = parse_margin(row.get("margin"))
    if margin is not None and math.isnan(margin):
        return readers.Skip("bad margin")
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if chosen.startswith(prompt) and rejected.startswith(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        if row["chosen"] == row["rejected"]:
            return readers.Skip("chosen == rejected")
        parts = split_transcripts(row["chosen"], row["rejected"])
        if parts is None:
            return readers.Skip("no shared prompt")
        prompt, chosen, rejected = parts
    if chosen == rejected:
        return readers.Skip("chosen == rejected")
    if not chosen.strip() or not rejected.strip():
        return readers.Skip("empty response")
    return Pair(prompt, chosen, rejected, margin, source)


def conversation_pair(row: dict, source: str, chat_format: "chat.ChatFormat | None") -> Pair | readers.Skip:
    """A row of message lists -> Pair of texts rendered with the chat template (chat.conversation_pair:
    the prompt is the messages chosen and rejected share, or the row's prompt), marked eos=False: TRL
    feeds the rendering as it is. No template is a UserError saying what to do."""
    if chat_format is None:
        from support import chat  # here: jinja2 loads with the first conversation, not with data.py
        chat_format = chat.ChatFormat(None, why_none="no chat template was given")
    margin = parse_margin(row.get("margin"))
    if margin is not None and math.isnan(margin):
        return readers.Skip("bad margin")
    texts = chat_format.pair(row.get("prompt"), row.get("chosen"), row.get("rejected"), source)
    return readers.Skip(texts) if isinstance(texts, str) else Pair(*texts, margin, source, eos=False)


# -----------------------------------------------------------------------------
# Sources -> pairs

def source_rows(source: str, split: str):
    """(names, fetch, read) of a source: the demo's generated rows, or its files, local or on the Hub
    (found now; fetch downloads a Hub shard when it is reached); read(fetch(name)) yields its rows."""
    if source != "demo":
        return (*hub.dataset_files(source, split), readers.read_file)
    if split not in demo.DEMO_SIZES:
        raise UserError(f"demo: no '{split}' split; available splits: {', '.join(demo.DEMO_SIZES)}")
    return [split], (lambda name: name), demo.demo_rows


def iter_pairs(source: str, split: str = "train", stats: DataStats | None = None,
               chat_format: "chat.ChatFormat | None" = None, char_cap: int | None = None) -> Iterator[Pair]:
    """Stream the pairs of one source. The files are found now (errors show at once), read lazily.
    chat_format renders conversational rows (Tokenizer.chat_format); char_cap cuts each text as it is
    read (cut_texts: Tokenizer.char_cap of the max_length the pairs will be tokenised at)."""
    stats = stats if stats is not None else DataStats()
    names, fetch, read = source_rows(source, split)

    def generate():
        for name in names:
            for row in read(fetch(name)):
                result = row if isinstance(row, readers.Skip) else make_pair(row, source, chat_format)
                stats.count(result)
                if isinstance(result, Pair):
                    yield cut_texts(result, char_cap) if char_cap else result
    return generate()


def load_pairs(sources: str | list[str], split: str = "train", max_samples: int | None = None,
               stats: DataStats | None = None, chat_format: "chat.ChatFormat | None" = None,
               char_cap: int | None = None) -> list[Pair]:
    """Pairs of one or several sources (a list, or "a,b"), interleaved round-robin so that
    max_samples takes from all of them; each Pair keeps its source. The first max_samples in file
    order, not a random sample: batch_order shuffles. A list is taken as given (a file name may hold a
    comma); a string is split on commas only when it is not an existing path."""
    if isinstance(sources, str):
        whole = os.path.exists(os.path.expanduser(sources))
        sources = [sources] if whole else [s.strip() for s in sources.split(",") if s.strip()]
    if not sources:
        raise UserError("no data source given; name a Hub dataset, a local file/directory, or demo")
    stats = stats if stats is not None else DataStats()
    active = [iter_pairs(s, split, stats, chat_format, char_cap) for s in sources]
    pairs = []
    while active and (max_samples is None or len(pairs) < max_samples):
        for it in list(active):
            pair = next(it, None)
            if pair is None:
                active.remove(it)
                continue
            pairs.append(pair)
            if max_samples is not None and len(pairs) >= max_samples:
                break
    if not pairs and stats.read == 0:
        raise UserError(f"no usable pairs in {', '.join(sources)} ({split}): it is empty (0 rows read); "
                        "check the data and the path")
    if not pairs:
        raise UserError(f"no usable pairs in {', '.join(sources)} ({split}): {stats.read} rows read, every one "
                        f"skipped {stats.skipped}; check the data")
    return pairs


# -----------------------------------------------------------------------------
# A held-out share of one source, and what the run read (to notice a changed file on resume)

def pair_key(pair: Pair) -> bytes:
    """A pair's content (prompt, chosen, rejected): the same pair in two files, or twice in one, is one key."""
    return "\0".join((pair.prompt, pair.chosen, pair.rejected)).encode("utf-8", "surrogatepass")


def content_hash(pair: Pair) -> bytes:
    """8 bytes of hash of the pair's whole texts, also once they were cut as read (kept in key_hash)."""
    return pair.key_hash or hashlib.blake2b(pair_key(pair), digest_size=8).digest()


def is_held_out(pair: Pair, fraction: float) -> bool:
    """Whether the pair belongs to the held-out share `fraction`: its content's hash, read as a number in
    [0, 1), falls below it. A pure function of the pair, so the split is the same in every run, on resume
    and in eval.py (at any max_length), no pair is on both sides, and adding rows never moves a pair."""
    return int.from_bytes(content_hash(pair), "big") / 2**64 < fraction


def split_held_out(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs), in their order, by is_held_out."""
    held = [is_held_out(p, fraction) for p in pairs]
    return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]


def pairs_digest(pairs: list[Pair]) -> str:
    """A short fingerprint of the pairs, in order: equal digests, the same training data. Made of each pair's
    content_hash, so that it is the same whether the texts were cut as read or not (at any max_length)."""
    h = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        h.update(content_hash(pair))
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Pair -> TokenizedPair

@dataclass
class TokenizedPair:
    chosen_ids: list[int]       # kept prompt + chosen response (+ eos)
    rejected_ids: list[int]     # kept prompt + rejected response (+ eos)
    margin: float | None
    source: str
    prompt_len: int             # prompt tokens kept (the same in both)
    chosen_response_len: int    # response tokens, without an appended eos (for eval's length analysis)
    rejected_response_len: int

    @property
    def length(self) -> int:
        """The padded length this pair needs in a batch."""
        return max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def tokens(self) -> int:
        """Its tokens, the prompt counted in both (what length-grouped training batches even out)."""
        return len(self.chosen_ids) + len(self.rejected_ids)


def split_at_response(chosen, rejected, prompt_chars: int) -> tuple[list[int], list[int], list[int]]:
    """The tokenizer's Encodings of prompt + chosen and prompt + rejected -> (prompt ids, chosen ids,
    rejected ids), the responses' ids after the prompt. The prompt's tokens end within its `prompt_chars`
    characters (a token that crosses into the response belongs to the response) and are the same in both,
    so truncation can cut them alike."""
    n = min(bisect.bisect_right(enc.offsets, prompt_chars, key=lambda o: o[1]) for enc in (chosen, rejected))
    c, r = chosen.ids, rejected.ids
    if c[:n] != r[:n]:  # a BPE merge just before the boundary that differs: the split falls earlier
        n = next(i for i in range(n) if c[i] != r[i])
    return c[:n], c[n:], r[n:]


def truncate_pair(pair: Pair, prompt: list[int], chosen: list[int], rejected: list[int],
                  tok: tokenizer.Tokenizer, max_length: int, stats: DataStats) -> TokenizedPair | None:
    """Token ids -> TokenizedPair within max_length: the prompt is cut from the LEFT (its end, the question
    being answered, stays), by the same tokens for both; a response and its eos are never cut, so a pair
    whose longer response alone does not fit is dropped. Both are counted in stats."""
    if max_length < 2:
        raise UserError(f"max_length {max_length} is too small; use at least 2 (one token + eos)")
    ends = [tok.eos_suffix(ids) if pair.eos else [] for ids in (chosen, rejected)]
    longest = max(len(chosen) + len(ends[0]), len(rejected) + len(ends[1]))
    if longest > max_length:
        stats.dropped_too_long += 1
        return None
    keep = min(len(prompt), max_length - longest)  # same prompt tokens for chosen and rejected
    if keep < len(prompt):
        stats.truncated_prompt += 1
    prompt = prompt[len(prompt) - keep:]           # cut from the left: keep the question's end
    stats.tokenized += 1
    return TokenizedPair(prompt + chosen + ends[0], prompt + rejected + ends[1], pair.margin, pair.source,
                         len(prompt), len(chosen), len(rejected))


def cap_texts(pair: Pair, cap: int, stats: DataStats) -> Pair | None:
    """Bound what the tokenizer is given (a 10 MB text took 4.6 GB and a minute to tokenise): a pair whose
    response has more than `cap` characters cannot fit and is dropped as too long (counted) untokenised; a
    longer prompt keeps its last `cap` characters, more than the left cut can keep of it."""
    if pair.cut_to and pair.cut_to < cap:  # its prompt lost characters this max_length would use
        raise ValueError(f"a pair cut to {pair.cut_to} characters as it was read is tokenised for {cap}; "
                         "read the pairs with the char_cap of the max_length they are tokenised at")
    if max(len(pair.chosen), len(pair.rejected)) > cap:
        stats.dropped_too_long += 1
        return None
    if len(pair.prompt) > cap:
        return replace(pair, prompt=pair.prompt[-cap:])
    return pair


def cut_texts(pair: Pair, cap: int) -> Pair:
    """cap_texts' rule applied as the pair is read, so that the pairs kept hold what they can use (200 rows
    of 15 MiB took eval.py to 3 GB): a prompt keeps its last `cap` characters, a response over `cap` (so
    dropped when tokenised) its first cap + 1. cap_texts then finds the same texts: nothing changes."""
    if max(len(pair.prompt), len(pair.chosen), len(pair.rejected)) <= cap:
        return pair
    return replace(pair, prompt=pair.prompt[-cap:], chosen=pair.chosen[:cap + 1], rejected=pair.rejected[:cap + 1],
                   cut_to=cap, key_hash=content_hash(pair))


def tokenize_pairs(pairs: list[Pair], tok: tokenizer.Tokenizer, max_length: int,
                   stats: DataStats | None = None) -> list[TokenizedPair]:
    """prompt + response (+ eos) for both responses of each pair, tokenised whole, so the ids are those of
    score(prompt + response) and of transformers' tokenizer; pairs whose response does not fit are dropped
    (counted). Encoded in batches (the tokenizer runs them in parallel)."""
    stats = stats if stats is not None else DataStats()
    cap = tok.char_cap(max_length)
    pairs = [p for p in (cap_texts(pair, cap, stats) for pair in pairs) if p is not None]
    out = []
    for start in range(0, len(pairs), ENCODE_CHUNK):
        chunk = pairs[start:start + ENCODE_CHUNK]
        encs = tok.encode_batch([p.prompt + r for p in chunk for r in (p.chosen, p.rejected)])
        for i, pair in enumerate(chunk):
            ids = split_at_response(encs[2 * i], encs[2 * i + 1], len(pair.prompt))
            item = truncate_pair(pair, *ids, tok, max_length, stats)
            if item is not None:
                out.append(item)
    return out


def tokenize_pair(tok: tokenizer.Tokenizer, pair: Pair, max_length: int,
                  stats: DataStats | None = None) -> TokenizedPair | None:
    """tokenize_pairs for one pair; None if a response does not fit (counted)."""
    items = tokenize_pairs([pair], tok, max_length, stats)
    return items[0] if items else None


# -----------------------------------------------------------------------------
# TokenizedPair -> Batch

def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int = 0, shuffle: bool = True,
                sort_window: int = 50) -> list[list[int]]:
    """Indices cut into batches of similar length, every index exactly once, last partial batch kept.

    shuffle=True (training): shuffle with (seed, epoch), sort each run of `sort_window` batches' worth
    of indices by length, cut into batches, shuffle the batch order: random enough, little padding,
    and the same for the same seed and epoch. shuffle=False (evaluation): all sorted by length,
    longest first, so a batch too big for memory fails at once."""
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = random.Random(f"{seed}/{epoch}")  # str seeds are stable across runs and Python versions
    order = list(range(n))
    rng.shuffle(order)
    batches = []
    for start in range(0, n, batch_size * sort_window):
        chunk = sorted(order[start:start + batch_size * sort_window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_margins(items: list[TokenizedPair]):
    """(B,) float32 margins when any pair of the batch has one (a missing margin counts as 0), else None."""
    margins = [it.margin for it in items]
    if not any(m is not None for m in margins):
        return None
    return torch.tensor([0.0 if m is None else m for m in margins], dtype=torch.float32)


@dataclass
class Batch:
    """What the model gets for B pairs: 2B sequences, the B chosen ones first, then the B rejected ones.

    Padded (collate): input_ids/attention_mask (2B, T), right-padded. Packed or shared-prompt batches
    (support/packing.py): input_ids hold the tokens without padding, and `layout` says where each sequence is."""
    input_ids: torch.Tensor                 # (2B, T); with a packing.Layout (R, L) packed, (1, N) shared prompts
    attention_mask: torch.Tensor | None     # (2B, T), 1 = real token; None when there is a layout
    margin: torch.Tensor | None             # (B,) how much better chosen must be, or None
    layout: object = None                   # packing.Layout, or None for padded rows

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        layout = None if self.layout is None else self.layout.to(device)
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.margin), layout)

    def num_tokens(self) -> torch.Tensor:
        """Real tokens in the 2B sequences (prompt tokens counted in both), for tokens/s."""
        if self.layout is None:
            return self.attention_mask.sum()
        return (self.layout.sequence_ids >= 0).sum()


def collate(items: list[TokenizedPair], pad_id: int) -> Batch:
    """B pairs -> one padded batch: rows 0..B-1 chosen, rows B..2B-1 rejected, so ONE forward pass scores both:
    the backbone's weights are read once for both (under FSDP, gathered once), and both rewards come from the
    same kernels at one batch shape, so their difference, all that the loss sees, holds no offset between passes."""
    rows = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    input_ids, attention_mask = tokenizer.pad_rows(rows, pad_id)
    return Batch(input_ids, attention_mask, batch_margins(items))
