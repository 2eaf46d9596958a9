"""Preference data, top to bottom: rows -> Pair -> TokenizedPair -> Batch.

- Sources (iter_pairs, load_pairs): "demo" (demo.py, generated offline), a local .parquet, .jsonl,
  .jsonl.gz or .json file, directory or glob, or a Hub dataset id such as Anthropic/hh-rlhf (hub.py
  finds the files). Files stream: parquet a batch of rows at a time over the needed columns only, jsonl
  line by line; a JSON *list* file is the exception, parsed whole (use jsonl for big files).
- Memory is bounded before anything is parsed: a jsonl line or parquet row over MAX_ROW_BYTES is skipped
  ("row too large") without being held whole, a JSON list file over MAX_JSON_LIST_BYTES is refused, and
  a text longer than max_length tokens can be (text_char_cap) is never handed to the tokenizer.
- Rows -> Pair: prompt/chosen/rejected columns are taken as given; chosen/rejected alone are whole
  hh-rlhf transcripts, split after the last "\\n\\nAssistant:" they share. Conversational rows (lists of
  {"role", "content"} messages) are rendered with the model's chat template (chat.py). A `margin`
  column is carried. A bad row is skipped with its reason and counted: read == kept + sum(skipped).
  Wrong columns, a missing, unsupported or corrupt file are UserErrors naming the path.
- Pair -> TokenizedPair: the joined text prompt + response is tokenised whole (the ids transformers and
  TRL see), split at the response's first character, eos appended (see Tokenizer.eos_suffix; none for
  a rendered conversation); max_length cuts the prompt from the LEFT and never a response (a pair whose
  response alone does not fit is dropped and counted).
- TokenizedPair -> Batch: batch_order groups similar lengths; collate pads the B chosen rows, then the
  B rejected ones, so one forward pass scores both (packing.py lays them out without padding).
- `python data.py SOURCE` streams a source and prints the counts and the peak memory growth.
"""
import argparse
import bisect
import gzip
import hashlib
import json
import math
import os
import random
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from support import chat
from support import hub
from support.errors import UserError, run_cli

ASSISTANT = "\n\nAssistant:"  # hh-rlhf turn marker; prompts end with it
PARQUET_BATCH_ROWS = 64       # parquet rows decoded at a time
MAX_ROW_BYTES = 16 << 20      # a jsonl line / parquet row's text: 3 texts of over 1M tokens each, even escaped
MAX_JSON_LIST_BYTES = 64 << 20  # a JSON list is parsed whole: ~5x its size in Python objects
SKIP_CHUNK = 1 << 20          # an over-long line is skipped this many bytes at a time
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


class Skip(NamedTuple):
    """A row that does not become a Pair, and why: "empty field" (null, missing or blank), "not a string"
    (e.g. a number), "bad margin", "chosen == rejected", "no shared prompt", "empty response",
    "row too large" (over MAX_ROW_BYTES), and for jsonl "unparsable line" (also nested too deeply for
    Python's parser) / "not an object"."""
    reason: str


@dataclass
class DataStats:
    """What happened to every row, so that nothing is lost without a count."""
    read: int = 0                                            # rows (or jsonl lines) read
    kept: int = 0                                            # rows that became a Pair
    skipped: dict[str, int] = field(default_factory=dict)    # reason -> rows
    sources: dict[str, int] = field(default_factory=dict)    # source -> pairs kept
    tokenized: int = 0                                       # pairs that fit max_length
    truncated_prompt: int = 0                                # ... of which the prompt was cut
    dropped_too_long: int = 0                                # pairs whose response alone did not fit

    def count(self, row: "Pair | Skip"):
        """One row read: kept as a Pair, or skipped with its reason."""
        self.read += 1
        if isinstance(row, Skip):
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
                "dropped_too_long": self.dropped_too_long}


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
    cut = chosen.rfind(ASSISTANT, 0, common_prefix_len(chosen, rejected))
    if cut < 0:
        return None
    cut += len(ASSISTANT)
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


def make_pair(row: dict, source: str, chat_format: chat.ChatFormat | None = None) -> Pair | Skip:
    """One row of a file's layout ("prompt" among its keys or not decides which) -> Pair, or Skip(reason).

    With a prompt column, whole texts (chosen and rejected both starting with the prompt) lose it. A row
    whose chosen or rejected is a list is a conversation: see conversation_pair."""
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        return conversation_pair(row, source, chat_format)
    texts = [row[k] for k in ("prompt", "chosen", "rejected") if k in row]
    if any(t is None for t in texts):
        return Skip("empty field")
    if any(not isinstance(t, str) for t in texts):
        return Skip("not a string")
    if any(not t.strip() for t in texts):
        return Skip("empty field")
    margin = parse_margin(row.get("margin"))
    if margin is not None and math.isnan(margin):
        return Skip("bad margin")
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if chosen.startswith(prompt) and rejected.startswith(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        if row["chosen"] == row["rejected"]:
            return Skip("chosen == rejected")
        parts = split_transcripts(row["chosen"], row["rejected"])
        if parts is None:
            return Skip("no shared prompt")
        prompt, chosen, rejected = parts
    if chosen == rejected:
        return Skip("chosen == rejected")
    if not chosen.strip() or not rejected.strip():
        return Skip("empty response")
    return Pair(prompt, chosen, rejected, margin, source)


def conversation_pair(row: dict, source: str, chat_format: chat.ChatFormat | None) -> Pair | Skip:
    """A row of message lists -> Pair of texts rendered with the chat template (chat.conversation_pair:
    the prompt is the messages chosen and rejected share, or the row's prompt), marked eos=False: TRL
    feeds the rendering as it is. No template is a UserError saying what to do."""
    if chat_format is None:
        chat_format = chat.ChatFormat(None, why_none="no chat template was given")
    margin = parse_margin(row.get("margin"))
    if margin is not None and math.isnan(margin):
        return Skip("bad margin")
    texts = chat_format.pair(row.get("prompt"), row.get("chosen"), row.get("rejected"), source)
    return Skip(texts) if isinstance(texts, str) else Pair(*texts, margin, source, eos=False)


# -----------------------------------------------------------------------------
# File -> rows: each reader streams dicts of the layout's columns, or Skip for what is not a row

def read_file(path: str) -> Iterator[dict | Skip]:
    if path.endswith(".parquet"):
        return read_parquet(path)
    if path.endswith(".json"):
        return read_json(path)
    return read_jsonl(path)


def layout_columns(found: list[str], path: str) -> list[str]:
    """The columns to read for the file's layout; a UserError if it has neither layout."""
    names = set(found)
    if {"prompt", "chosen", "rejected"} <= names:
        columns = ["prompt", "chosen", "rejected"]
    elif {"chosen", "rejected"} <= names:
        columns = ["chosen", "rejected"]
    else:
        raise UserError(f"{path}: has columns {sorted(names)}, expected prompt, chosen, rejected "
                        f"(or chosen, rejected holding whole hh-rlhf transcripts); rename the columns")
    return columns + ["margin"] if "margin" in names else columns


def read_parquet(path: str) -> Iterator[dict | Skip]:
    try:
        # pyarrow's defaults (pre_buffer=True, decoding threads) keep what was read cached, so memory
        # grows with the file; without them it stays flat (figures in BENCHMARKS.md)
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        columns = layout_columns(pf.schema_arrow.names, path)  # read only these
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns, use_threads=False):
            fits = row_bytes(batch) <= MAX_ROW_BYTES  # measured in Arrow: a huge cell never becomes a str
            yield from [Skip("row too large")] * int((~fits).sum())
            batch = batch.filter(pa.array(fits)) if not fits.all() else batch
            values = [batch.column(c).to_pylist() for c in columns]
            for row in zip(*values):
                yield dict(zip(columns, row))
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e}); re-download or rewrite it") from None


def row_bytes(batch: pa.RecordBatch) -> np.ndarray:
    """The bytes of text in each row of a record batch (string columns; nulls count 0)."""
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            total += pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)
    return total


def read_jsonl(path: str) -> Iterator[dict | Skip]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from object_rows(json_lines(f), path)
    except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
        raise UserError(f"{path}: can't read it to the end ({e}); the file is corrupt or truncated, "
                        f"re-download it") from None


def read_json(path: str) -> Iterator[dict | Skip]:
    with open(path, "rb") as f:
        is_list = f.read(4096).removeprefix(BOM).lstrip().startswith(b"[")
    if not is_list:  # jsonl content in a .json file
        yield from read_jsonl(path)
        return
    size = os.path.getsize(path)
    if size > MAX_JSON_LIST_BYTES:
        raise UserError(f"{path}: a JSON list is parsed whole and this one is {size / 2**20:.0f} MiB (the limit is "
                        f"{MAX_JSON_LIST_BYTES >> 20} MiB); write one object per line (.jsonl), which streams: "
                        f"jq -c '.[]' {path} > {path.removesuffix('.json')}.jsonl") from None
    try:
        with open(path, "rb") as f:
            objs = json.load(f)  # a JSON list can only be parsed whole; bytes in: a UTF-8 BOM is accepted
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: invalid JSON ({e}); fix it or write one object per line (.jsonl)") from None
    yield from object_rows(objs, path)


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors write at the start of a file


def bounded_lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file, or None for a line over `limit` bytes: only its first limit + 1 bytes
    are read at once, the rest is skipped SKIP_CHUNK bytes at a time, so memory stays bounded."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while (rest := f.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield None


def json_lines(f) -> Iterator:
    """The JSON value of each non-blank line (at most MAX_ROW_BYTES), or the Skip saying why not."""
    for line in bounded_lines(f, MAX_ROW_BYTES):
        if line is None:
            yield Skip("row too large")
        elif line.strip():
            try:
                yield json.loads(line)  # bytes in: bad UTF-8 is a ValueError too, a BOM is accepted
            except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
                yield Skip("unparsable line")


def object_rows(objects, path: str) -> Iterator[dict | Skip]:
    """Parsed JSON values -> rows of the needed columns (fixed by the first object, like a parquet
    schema); anything that is not an object is skipped."""
    columns = None
    for obj in objects:
        if isinstance(obj, Skip):
            yield obj
        elif not isinstance(obj, dict):
            yield Skip("not an object")
        else:
            if columns is None:
                columns = layout_columns(list(obj), path)
            yield {c: obj.get(c) for c in columns}


# -----------------------------------------------------------------------------
# Sources -> pairs

def iter_pairs(source: str, split: str = "train", stats: DataStats | None = None,
               chat_format: chat.ChatFormat | None = None) -> Iterator[Pair]:
    """Stream the pairs of one source. The files are found now (errors show at once), read lazily.
    chat_format renders conversational rows (Tokenizer.chat_format)."""
    stats = stats if stats is not None else DataStats()
    if source == "demo":
        from support import demo  # here, not at the top: demo.py imports this module
        if split not in demo.DEMO_SIZES:
            raise UserError(f"demo: no '{split}' split; available splits: {', '.join(demo.DEMO_SIZES)}")
        names, fetch, read = [split], (lambda name: name), demo.demo_rows
    else:
        names, fetch = hub.dataset_files(source, split)  # fetch downloads a Hub shard when it is reached
        read = read_file

    def generate():
        for name in names:
            for row in read(fetch(name)):
                result = row if isinstance(row, Skip) else make_pair(row, source, chat_format)
                stats.count(result)
                if isinstance(result, Pair):
                    yield result
    return generate()


def load_pairs(sources: str | list[str], split: str = "train", max_samples: int | None = None,
               stats: DataStats | None = None, chat_format: chat.ChatFormat | None = None) -> list[Pair]:
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
    active = [iter_pairs(s, split, stats, chat_format) for s in sources]
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


def is_held_out(pair: Pair, fraction: float) -> bool:
    """Whether the pair belongs to the held-out share `fraction`: its content's hash, read as a number in
    [0, 1), falls below it. A pure function of the pair, so the split is the same in every run, on resume
    and in eval.py, no pair is on both sides, and adding rows never moves a pair to the other side."""
    digest = hashlib.blake2b(pair_key(pair), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_held_out(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs), in their order, by is_held_out."""
    held = [is_held_out(p, fraction) for p in pairs]
    return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]


def source_files(source: str, split: str) -> set[str]:
    """What a source reads for `split`, comparable across sources without reading or downloading: local
    files by their real path, a Hub dataset or the demo by name and split."""
    if source != "demo" and hub.is_local_source(source):
        return {os.path.realpath(p) for p in hub.local_files(source, split)}
    return {f"{source} ({split})"}


def pairs_digest(pairs: list[Pair]) -> str:
    """A short fingerprint of the pairs, in order: equal digests, the same training data."""
    h = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        key = pair_key(pair)
        h.update(len(key).to_bytes(8, "big") + key)
    return h.hexdigest()


def file_fingerprints(sources: list[str], split: str) -> dict[str, list[int]]:
    """{real path: [size in bytes, mtime in ns]} of the local files of `sources`."""
    files = set().union(*(source_files(s, split) for s in sources))
    return {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(files) if os.path.isfile(f)}


# -----------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """A thin wrapper over tokenizers.Tokenizer that knows its eos, pad and bos ids and the chat template."""

    def __init__(self, tok, eos_token: str, pad_token: str, config: dict | None = None,
                 chat_template: str | None = None):
        self.tok = tok
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id, self.pad_id = tok.token_to_id(eos_token), tok.token_to_id(pad_token)
        if self.eos_id is None or self.pad_id is None:
            raise UserError(f"tokenizer: eos {eos_token!r} or pad {pad_token!r} is not in the vocabulary; "
                            f"fix eos_token/pad_token in tokenizer_config.json")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # no token covers more characters than its vocabulary string has (bytes, for byte-level BPE)
        self.max_token_chars = max(map(len, tok.get_vocab(with_added_tokens=True)), default=1)
        self.config = dict(config or {})  # the rest of tokenizer_config.json, written back by save()
        bos = chat.special_token_variables(self.config).get("bos_token")
        self.bos_id = tok.token_to_id(bos) if bos else None  # Qwen3 uses none
        self.chat_template = chat_template  # renders conversations (chat.py); saved as chat_template.jinja

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise UserError(f"{path}: no tokenizer.json; point at a model directory (a Hub download "
                            f"or one saved by train.py)")
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise UserError(f"{file}: not a valid tokenizer.json ({e}); re-download it") from None
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file):
            try:
                with open(config_file) as f:
                    config = json.load(f)
            except ValueError as e:
                raise UserError(f"{config_file}: invalid JSON ({e}); re-download it") from None
            if not isinstance(config, dict):
                raise UserError(f"{config_file}: not a JSON object; re-download it")
        named = chat.special_token_variables(config)

        def token(key, defaults):
            return named.get(key) or next((t for t in defaults if tok.token_to_id(t) is not None), defaults[0])
        # Qwen3 defaults: post-trained models end turns with <|im_end|>; <|endoftext|> pads
        eos = token("eos_token", ["<|im_end|>", "<|endoftext|>"])
        pad = token("pad_token", ["<|endoftext|>", eos])
        return cls(tok, eos, pad, config, chat.load_chat_template(path, tokenizer_config=config))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list:
        """tokenizers Encodings (.ids, and .offsets: each token's characters), encoded in parallel."""
        return self.tok.encode_batch(texts, add_special_tokens=False)

    def eos_suffix(self, ids: list[int]) -> list[int]:
        """[eos_id] to end a text's ids with, or [] when they already end with it (no doubled eos) or when
        eos == pad: transformers, TRL and vLLM pool the last token that is NOT pad, so there an appended
        eos would be skipped, and our last token would no longer be theirs."""
        return [] if self.eos_id == self.pad_id or (ids and ids[-1] == self.eos_id) else [self.eos_id]

    def chat_format(self, choice: str = "auto") -> chat.ChatFormat:
        """--chat_template auto|none|PATH -> how conversational rows are rendered. A PATH's template
        replaces this tokenizer's, so that it is saved with the model and used again to score."""
        variables = {**chat.special_token_variables(self.config), "eos_token": self.eos_token,
                     "pad_token": self.pad_token}
        if choice == "none":
            return chat.ChatFormat(None, variables, "--chat_template is none; use --chat_template auto or PATH")
        if choice != "auto":
            self.chat_template = chat.load_chat_template(None, override=choice)
        return chat.ChatFormat(self.chat_template, variables, "the model's tokenizer has no chat template; "
                               "pass --chat_template PATH (a .jinja file, e.g. the instruct model's)")

    def sequence(self, value, max_length: int | None = None) -> list[int]:
        """The ids the model reads for a whole text (+ eos_suffix) or a conversation (a list of messages,
        rendered with the chat template, nothing appended), as training feeds them. Longer than
        max_length keeps the END (the response), as training does: only the text's last text_char_cap
        characters are tokenised (a 5 MB text cost 450 MB), more than max_length tokens can cover."""
        text = value if isinstance(value, str) else self.chat_format().render(value)
        ids = self.encode(text[-text_char_cap(self, max_length):] if max_length else text)
        if isinstance(value, str):
            ids = ids + self.eos_suffix(ids)
        return ids[-max_length:] if max_length else ids

    def save(self, path: str):
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        config = {**self.config, "eos_token": self.eos_token, "pad_token": self.pad_token}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # loadable by transformers too
        if self.chat_template is not None:  # where transformers saves it (and looks first)
            config.pop("chat_template", None)
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


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


def split_at_response(chosen, rejected, prompt_chars: int) -> tuple[list[int], list[int], list[int]]:
    """Two tokenizers Encodings of prompt + response -> (prompt ids, chosen ids, rejected ids) after the
    prompt. The prompt's tokens end within its `prompt_chars` characters (a token that crosses into the
    response belongs to the response) and are the same in both, so truncation can cut them alike."""
    n = min(bisect.bisect_right(enc.offsets, prompt_chars, key=lambda o: o[1]) for enc in (chosen, rejected))
    c, r = chosen.ids, rejected.ids
    if c[:n] != r[:n]:  # a BPE merge just before the boundary that differs: the split falls earlier
        n = next(i for i in range(n) if c[i] != r[i])
    return c[:n], c[n:], r[n:]


def truncate_pair(pair: Pair, prompt: list[int], chosen: list[int], rejected: list[int], tok: Tokenizer,
                  max_length: int, stats: DataStats) -> TokenizedPair | None:
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


def text_char_cap(tok: Tokenizer, max_length: int) -> int:
    """The most characters a text can have and still fit in max_length tokens. A token covers at most
    tok.max_token_chars characters (its vocabulary string's length), so this bound never drops a pair that
    would fit; it fails only for tokenizers that map a whole unknown word to one token (WordLevel's unk)."""
    return max(max_length, 1) * tok.max_token_chars


def cap_texts(pair: Pair, cap: int, stats: DataStats) -> Pair | None:
    """Bound what the tokenizer is given (a 10 MB text took 4.6 GB and a minute to tokenise): a pair whose
    response has more than `cap` characters cannot fit and is dropped as too long (counted) untokenised; a
    longer prompt keeps its last `cap` characters, more than the left cut can keep of it."""
    if max(len(pair.chosen), len(pair.rejected)) > cap:
        stats.dropped_too_long += 1
        return None
    if len(pair.prompt) > cap:
        return replace(pair, prompt=pair.prompt[-cap:])
    return pair


def tokenize_pairs(pairs: list[Pair], tok: Tokenizer, max_length: int,
                   stats: DataStats | None = None) -> list[TokenizedPair]:
    """prompt + response (+ eos) for both responses of each pair, tokenised whole, so the ids are those of
    score(prompt + response) and of transformers' tokenizer; pairs whose response does not fit are dropped
    (counted). Encoded in batches (the tokenizer runs them in parallel)."""
    stats = stats if stats is not None else DataStats()
    cap = text_char_cap(tok, max_length)
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


def tokenize_pair(tok: Tokenizer, pair: Pair, max_length: int,
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
    (packing.py): input_ids hold the tokens without padding, and `layout` says where each sequence is."""
    input_ids: torch.Tensor                 # (2B, T), or (R, N) for a packing.Layout
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


def pad_rows(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids, attention_mask (len(seqs), longest), right-padded with pad_id."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for row, ids in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


def collate(items: list[TokenizedPair], pad_id: int) -> Batch:
    """B pairs -> one padded batch: rows 0..B-1 chosen, rows B..2B-1 rejected, so ONE forward pass scores both."""
    input_ids, attention_mask = pad_rows([it.chosen_ids for it in items] + [it.rejected_ids for it in items], pad_id)
    return Batch(input_ids, attention_mask, batch_margins(items))


# -----------------------------------------------------------------------------
# `python data.py SOURCE`: stream a source, report the counts and the peak memory growth

def _rss_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise UserError(f"can't read {key} from /proc/self/status; memory reporting needs Linux")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stream a preference data source; print what was read, "
                                                 "skipped and kept, and the peak memory growth.")
    parser.add_argument("source", help="demo, a Hub dataset id, or a local file/directory/glob")
    parser.add_argument("--split", default="train", help="train or test (default: train)")
    parser.add_argument("--max-samples", type=int, default=None, help="stop after this many pairs")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a model directory: its tokenizer counts tokens and its chat template renders "
                             "conversational rows")
    parser.add_argument("--chat_template", default="auto", metavar="auto|none|PATH",
                        help="conversational rows: auto (the --model's template), none, or a .jinja file")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N pairs as the model reads them: prompt, chosen, rejected texts")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    tok = Tokenizer.from_dir(args.model) if args.model else None
    if tok is not None:
        chat_format = tok.chat_format(args.chat_template)
    else:
        template = None if args.chat_template in ("auto", "none") else chat.load_chat_template(None, args.chat_template)
        chat_format = chat.ChatFormat(template, why_none="none was given; pass --model DIR or --chat_template PATH")
    try:  # reset the peak RSS counter (Linux >= 4.0) so that VmHWM measures only the reading
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _rss_mib("VmRSS")
    stats = DataStats()
    for n, pair in enumerate(iter_pairs(args.source, args.split, stats, chat_format), 1):
        if n <= args.show:
            show_pair(n, pair, tok)
        if args.max_samples is not None and n >= args.max_samples:
            break
    print(json.dumps(stats.report(), indent=1))
    print(f"peak RSS growth while reading: {_rss_mib('VmHWM') - before:.1f} MiB")


def show_pair(n: int, pair: Pair, tok: Tokenizer | None):
    """One pair as the model reads it (repr: newlines and special tokens show), with token counts."""
    print(f"--- pair {n} ({pair.source}{'' if pair.margin is None else f', margin {pair.margin}'})")
    if tok is None:
        counts = ("", "", "")
    else:
        item = tokenize_pair(tok, pair, 1 << 30)
        counts = [f" ({k} tokens)" for k in (item.prompt_len, item.chosen_response_len, item.rejected_response_len)]
    for name, text, count in zip(("prompt", "chosen", "rejected"), (pair.prompt, pair.chosen, pair.rejected), counts):
        print(f"{name}{count}: {text!r}")
    if not pair.eos:
        print("then: nothing (a chat-template rendering ends as the template says)")
    elif tok is not None:
        print(f"then: {tok.eos_token!r}, unless the text ends with it already or eos == pad")


if __name__ == "__main__":
    run_cli(main)
