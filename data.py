"""Preference data: read (prompt, chosen, rejected) pairs, tokenise them, batch them.

Read top to bottom: sources -> rows -> Pair -> TokenizedPair -> batches; then the offline demo task.

Sources (`iter_pairs(source, split)`)
- "demo": a synthetic task generated here (see the end of the file), no files, no network.
- A local path: a `.parquet`, `.jsonl`, `.jsonl.gz` or `.json` file (a JSON list of objects, or
  one object per line); a directory (every supported file inside, recursively, sorted); or a glob
  (quote it in the shell). A file or a glob is taken as given and `split` is ignored. A directory
  is split-aware when its files carry split names (`train.jsonl`, `test-00000-of-00001.parquet`,
  `train/0000.parquet`, `partial-train/...`): then only the files of `split` are read, and an unknown
  split is an error listing the ones there. A directory without split names is read whole.
- A Hub dataset id `org/name` (anything that is not an existing path and looks like one), e.g.
  Anthropic/hh-rlhf, Dahoas/rm-static, Dahoas/full-hh-rlhf. The repo is listed on branch main; if it
  has no parquet files for the split, the Hub's parquet conversion (revision refs/convert/parquet,
  `default/{split}/NNNN.parquet`) is used instead, else main's json/jsonl(.gz) files (hh-rlhf's
  `*/{split}.jsonl.gz`). Shards are fetched one at a time with hf_hub_download (the normal HF
  cache). A repo whose files carry no split names counts as one "train" split (the HF convention).
  Offline (HF_HUB_OFFLINE=1, read at call time, not only at import) or when listing fails (no
  network), the files come from the local HF cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
  ~/.cache/huggingface/hub): the snapshot that refs/main or refs/refs/convert/parquet points at,
  else the newest snapshot. Only what was downloaded before is there, so a note on stderr says
  how many cached files are read.
- Files are STREAMED: parquet with ParquetFile.iter_batches over the needed columns only, jsonl
  line by line. Memory does not grow with the file: `python data.py FILE` reads a source and
  prints the peak RSS growth. Iterating 100k pairs (prompt/chosen/rejected of 1,000 characters
  each: a 288 MiB uncompressed parquet file, as written by test_parquet_streaming_memory_is_flat)
  with `python data.py pairs100k.parquet` grows the peak RSS by 43 MiB (reading takes ~1 s);
  a 3x larger file: 46 MiB. A JSON *list* file is the exception: it is parsed whole, so use
  jsonl for big files.

Rows -> Pair (chosen/rejected hold the responses only; the full text is prompt + response)
- prompt/chosen/rejected columns (rm-static, full-hh-rlhf): taken as given. If chosen and rejected
  both start with the prompt (some datasets store whole texts), the prompt is cut off them.
  A `margin` column, if present, is carried.
- chosen/rejected only (hh-rlhf): whole transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...". The prompt
  is the longest common prefix of the two, cut just after the LAST "\\n\\nAssistant:" inside it; the
  responses are what follows. When the transcripts differ before their last turn, the responses
  hold several turns (the prompt stays the part both share). Without any shared "\\n\\nAssistant:"
  the row is skipped as "no shared prompt".
- Bad rows are skipped and counted in DataStats.skipped by reason: "empty field" (null, missing or
  blank), "not a string" (e.g. chat-message lists), "bad margin", "chosen == rejected",
  "no shared prompt", "empty response", and for jsonl "unparsable line" / "not an object"; reading
  goes on. Every row read is either kept or counted: read == kept + sum(skipped).
  Wrong columns, a missing file, an unsupported extension, an empty glob or a corrupt/truncated
  file are UserErrors naming the path.

Tokenisation (`tokenize_pair`)
- Prompt and responses are tokenised separately and joined: prompt + response + [eos]. At the
  boundary this can differ from tokenising the joined text (a BPE merge across it), but it is the
  same for chosen and rejected and lets us truncate exactly. rm.py's score(texts) path encodes
  whole texts (`tok.encode(text) + [eos]`); the two agree whenever the response starts a new
  pre-token, as " Sure" after "Assistant:" does with Qwen's byte-level BPE.
- max_length never cuts a response or its eos: the prompt is cut from the LEFT (its end, the
  question being answered, is kept), by the same number of tokens for chosen and rejected. If the
  longer response + eos alone does not fit, the pair is dropped and counted (dropped_too_long),
  never silently lost; prompts that had to be cut are counted too (truncated_prompt).

Batching
- batch_order groups similar lengths to cut padding: shuffle with (seed, epoch), cut into windows
  of 50 batches, sort each window by length, cut into batches, shuffle the batches. collate puts
  the B chosen rows first, then the B rejected rows, right-padded, so one forward pass scores both.
- collate_packed (train.py --packing) lays the same 2B sequences end to end in one row, with positions
  restarting per sequence and their boundaries (cu_seqlens): no padding at all (qwen3.py confines
  attention to each sequence). On hh-rlhf-like lengths that halves the tokens of a step.
- share_prompt=True (train.py --share_prompt, either collate): chosen and rejected begin with the same
  prompt, so the model's input holds it once per pair, and no padding; only attention sees the 2B
  sequences whole, in the rows above (see collate_packed).
"""
import argparse
import glob
import gzip
import json
import math
import os
import random
import re
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from errors import UserError, run_cli

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json")
PARQUET_REVISION = "refs/convert/parquet"  # where the Hub keeps its parquet conversion of a dataset
ASSISTANT = "\n\nAssistant:"               # hh-rlhf turn marker; prompts end with it


# -----------------------------------------------------------------------------
# Pairs and counters

@dataclass
class Pair:
    """One preference: the same prompt answered twice. chosen/rejected are the responses only."""
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    source: str = ""  # "Anthropic/hh-rlhf", "demo", or the local path as given


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

    def skip(self, reason: str):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def report(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "skipped_total": sum(self.skipped.values()), "sources": dict(self.sources),
                "tokenized": self.tokenized, "truncated_prompt": self.truncated_prompt,
                "dropped_too_long": self.dropped_too_long}


# -----------------------------------------------------------------------------
# Rows -> Pair

def _common_prefix_len(a: str, b: str) -> int:
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

    The prompt ends just after the last "\\n\\nAssistant:" that lies inside the common prefix;
    None when there is none."""
    cut = chosen.rfind(ASSISTANT, 0, _common_prefix_len(chosen, rejected))
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def make_pair(row: dict | str, source: str, stats: DataStats) -> Pair | None:
    """One raw row -> Pair, or None (counted in stats with the reason).

    `row` holds the layout's columns ("prompt" present or not decides the layout), or is a string:
    the reason a reader could not make a row at all (e.g. "unparsable line")."""
    stats.read += 1
    if isinstance(row, str):
        stats.skip(row)
        return None
    texts = [row[k] for k in ("prompt", "chosen", "rejected") if k in row]
    if any(t is None for t in texts):
        stats.skip("empty field")
        return None
    if any(not isinstance(t, str) for t in texts):
        stats.skip("not a string")
        return None
    if any(not t.strip() for t in texts):
        stats.skip("empty field")
        return None
    margin = row.get("margin")
    if margin is not None:
        try:
            margin = float(margin)
        except (TypeError, ValueError):
            margin = math.nan
        if not math.isfinite(margin) or abs(margin) > 3.4e38:  # beyond float32: inf in the batch, inf loss
            stats.skip("bad margin")
            return None

    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if chosen.startswith(prompt) and rejected.startswith(prompt):  # whole texts stored
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        if row["chosen"] == row["rejected"]:
            stats.skip("chosen == rejected")
            return None
        parts = split_transcripts(row["chosen"], row["rejected"])
        if parts is None:
            stats.skip("no shared prompt")
            return None
        prompt, chosen, rejected = parts
    if chosen == rejected:
        stats.skip("chosen == rejected")
        return None
    if not chosen.strip() or not rejected.strip():
        stats.skip("empty response")
        return None
    stats.kept += 1
    stats.sources[source] = stats.sources.get(source, 0) + 1
    return Pair(prompt, chosen, rejected, margin, source)


# -----------------------------------------------------------------------------
# File readers: each yields dicts with the layout's columns (or a skip reason), streaming.

def _columns(found: list[str], path: str) -> list[str]:
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


BATCH_ROWS = 64  # parquet rows decoded at a time


def _read_parquet(path: str) -> Iterator[dict]:
    try:
        # Measured on the 288 MiB file of the memory test: with the defaults (pre_buffer=True)
        # every row group read so far stays cached and RSS grew by 390 MiB; pre_buffer=False and
        # a read buffer make pages stream (75-95 MiB), and one decoding thread stops the
        # allocator keeping per-thread pages (43 MiB, the same for a 3x larger file, no slower).
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        columns = _columns(pf.schema_arrow.names, path)  # read only these
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns, use_threads=False):
            values = [batch.column(c).to_pylist() for c in columns]
            for row in zip(*values):
                yield dict(zip(columns, row))
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e}); re-download or rewrite it") from None


_UNPARSABLE = object()  # what _json_lines yields for a line that is not JSON


def _json_lines(f) -> Iterator:
    for line in f:
        if line.strip():
            try:
                yield json.loads(line)  # bytes in: bad UTF-8 is a ValueError too
            except ValueError:
                yield _UNPARSABLE


def _object_rows(objects, path: str) -> Iterator[dict | str]:
    """Parsed JSON values -> rows of the needed columns (fixed by the first object, like a parquet
    schema); anything that is not an object -> the reason it is skipped."""
    columns = None
    for obj in objects:
        if obj is _UNPARSABLE:
            yield "unparsable line"
        elif not isinstance(obj, dict):
            yield "not an object"
        else:
            if columns is None:
                columns = _columns(list(obj), path)
            yield {c: obj.get(c) for c in columns}


def _read_jsonl(path: str) -> Iterator[dict | str]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from _object_rows(_json_lines(f), path)
    except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip
        raise UserError(f"{path}: can't read it to the end ({e}); the file is corrupt or truncated, "
                        f"re-download it") from None


def _read_json(path: str) -> Iterator[dict | str]:
    with open(path, "rb") as f:
        is_list = f.read(4096).lstrip().startswith(b"[")
    if not is_list:  # jsonl content in a .json file
        yield from _read_jsonl(path)
        return
    try:
        with open(path, "rb") as f:
            objs = json.load(f)  # a JSON list can only be parsed whole
    except ValueError as e:
        raise UserError(f"{path}: invalid JSON ({e}); fix it or write one object per line (.jsonl)") from None
    yield from _object_rows(objs, path)


def _read_file(path: str) -> Iterator[dict | str]:
    if path.endswith(".parquet"):
        return _read_parquet(path)
    if path.endswith(".json"):
        return _read_json(path)
    return _read_jsonl(path)


# -----------------------------------------------------------------------------
# Finding the files of a source

def _split_of(relpath: str) -> str | None:
    """The split a file belongs to by its name: train.jsonl, test-00000-of-00001.parquet,
    train/0000.parquet, partial-train/0000.parquet, harmless-base/test.jsonl.gz; else None."""
    parts = relpath.replace("\\", "/").split("/")
    stem = parts[-1]
    for suffix in SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    for name in [stem.split("-")[0]] + [p.removeprefix("partial-") for p in reversed(parts[:-1])]:
        if re.fullmatch(r"(train|test|validation|valid|dev|eval)\w*", name):
            return name
    return None


def _data_files(relpaths: list[str]) -> list[str]:
    """The supported files, sorted, leaving out hidden ones (.cache/, .git/ ...)."""
    return sorted(p for p in relpaths if p.endswith(SUFFIXES)
                  and not any(part.startswith(".") for part in p.replace("\\", "/").split("/")))


def _split_files(relpaths: list[str], split: str) -> tuple[list[str] | None, list[str]]:
    """(the data files of `split`, the splits there). None when no file carries a split name."""
    data = _data_files(relpaths)
    splits = {p: _split_of(p) for p in data}
    available = sorted({s for s in splits.values() if s})
    if not available:
        return None, []
    return [p for p in data if splits[p] == split], available


def _local_files(source: str, split: str) -> list[str]:
    path = os.path.expanduser(source)
    if any(c in path for c in "*?["):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise UserError(f"{source}: the pattern matches no files; check the path (and quote the pattern)")
        files = [p for p in matches if p.endswith(SUFFIXES)]
        if not files:
            raise UserError(f"{source}: the pattern matches no .parquet/.jsonl/.jsonl.gz/.json files")
        return files
    if os.path.isdir(path):
        relpaths = [os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path, followlinks=True)
                    for f in fs]
        files, available = _split_files(relpaths, split)
        if files is None:  # no split names: the whole directory, whatever the split
            files = _data_files(relpaths)
            if not files:
                raise UserError(f"{source}: the directory holds no .parquet/.jsonl/.jsonl.gz/.json files")
        elif not files:
            raise UserError(f"{source}: no '{split}' split in the directory; available splits: "
                            f"{', '.join(available)}")
        return [os.path.join(path, p) for p in files]
    if os.path.isfile(path):
        if not path.endswith(SUFFIXES):
            raise UserError(f"{source}: unsupported file type; use .parquet, .jsonl, .jsonl.gz or .json")
        return [path]
    raise UserError(f"{source}: no such file or directory (nor a Hub dataset id like Anthropic/hh-rlhf)")


def _hf_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; look at the environment now too
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_cache_dir() -> str:
    """The HF hub cache, from the environment as it is now."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expanduser(os.path.expandvars(cache))


def _pick_revision(repo: str, listings: list[tuple[str, list[str]]], split: str,
                   where: str) -> tuple[str, list[str]]:
    """(revision or snapshot dir, files of `split`): parquet files first, on whichever
    revision has them, then json/jsonl(.gz) files. A UserError listing the splits if none."""
    found, all_splits = [], set()
    for revision, relpaths in listings:
        files, available = _split_files(relpaths, split)
        if files is None:  # the HF convention: a repo without split names is one train split
            files = _data_files(relpaths) if split == "train" else []
            available = ["train"] if _data_files(relpaths) else []
        all_splits.update(available)
        if files:
            found.append((revision, sorted(files)))
    for revision, files in found:
        if any(f.endswith(".parquet") for f in files):
            return revision, [f for f in files if f.endswith(".parquet")]
    if found:
        return found[0]
    if not all_splits:
        raise UserError(f"{repo}: no .parquet/.jsonl/.jsonl.gz/.json data files {where}")
    raise UserError(f"{repo}: no '{split}' split {where}; available splits: {', '.join(sorted(all_splits))}")


def _cached_snapshots(repo: str, cache: str) -> list[tuple[str, str]]:
    """(revision, snapshot dir) of a dataset in the HF cache: refs first, then newest snapshots."""
    repo_dir = os.path.join(cache, "datasets--" + repo.replace("/", "--"))
    snapshots = os.path.join(repo_dir, "snapshots")
    found = []
    # the library writes refs/<revision>, so refs/convert/parquet lands in refs/refs/convert/parquet
    for revision in ("main", PARQUET_REVISION, "convert/parquet"):
        ref = os.path.join(repo_dir, "refs", revision)
        if os.path.isfile(ref):
            with open(ref) as f:
                snap = os.path.join(snapshots, f.read().strip())
            if os.path.isdir(snap) and snap not in [s for _, s in found]:
                found.append((revision, snap))
    if os.path.isdir(snapshots):
        others = [os.path.join(snapshots, d) for d in os.listdir(snapshots)]
        for snap in sorted(others, key=os.path.getmtime, reverse=True):
            if os.path.isdir(snap) and snap not in [s for _, s in found]:
                found.append((os.path.basename(snap), snap))
    return found


def _hub_files(repo: str, split: str) -> tuple[list[str], Callable[[str], str]]:
    """(files, fetch): fetch(file) returns a local path, downloading it if needed."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    cache = _hf_cache_dir()
    why_offline = "HF_HUB_OFFLINE is set"
    if not _hf_offline():
        api = HfApi()
        try:
            listings = [("main", api.list_repo_files(repo, repo_type="dataset"))]
            files, _ = _split_files(listings[0][1], split)
            if not any(f.endswith(".parquet") for f in files or []):
                try:
                    listings.append((PARQUET_REVISION, api.list_repo_files(repo, repo_type="dataset",
                                                                           revision=PARQUET_REVISION)))
                except RevisionNotFoundError:
                    pass  # no parquet conversion: use main's files
        except RepositoryNotFoundError:  # also gated/private repos without a token
            raise UserError(f"{repo}: no such dataset on the Hub (or it is private/gated: run "
                            f"`hf auth login`); check the name") from None
        except Exception as e:  # no network, Hub down, ...: try the cache below
            listings, why_offline = None, f"listing it on the Hub failed ({type(e).__name__}: {e})"
        if listings is not None:
            revision, files = _pick_revision(repo, listings, split, "on the Hub")

            def fetch(file):
                try:
                    return hf_hub_download(repo, file, repo_type="dataset", revision=revision, cache_dir=cache)
                except Exception as e:  # network gone, disk full, ...
                    raise UserError(f"{repo}: downloading {file} failed ({type(e).__name__}: {e}); check the "
                                    f"network and disk, or set HF_HUB_OFFLINE=1 to use what is cached") from None
            return files, fetch
    listings = []
    for revision, snap in _cached_snapshots(repo, cache):
        relpaths = [os.path.relpath(os.path.join(d, f), snap) for d, _, fs in os.walk(snap) for f in fs
                    if os.path.isfile(os.path.join(d, f))]  # skip links to missing blobs
        listings.append((snap, relpaths))
    if not any(relpaths for _, relpaths in listings):
        raise UserError(f"{repo}: {why_offline} and nothing of it is in the HF cache {cache}; run once "
                        f"online to download it, or point HF_HUB_CACHE at a cache that has it")
    snap, files = _pick_revision(repo, listings, split, f"in the HF cache {cache}")
    print(f"data: {repo} ({split}) offline: reading {len(files)} cached file(s) from {snap}", file=sys.stderr)
    return [os.path.join(snap, f) for f in files], lambda f: f


def _is_local(source: str) -> bool:
    return (os.path.exists(os.path.expanduser(source)) or source.endswith(SUFFIXES)
            or source.startswith((".", "/", "~")) or any(c in source for c in "*?[")
            or not re.fullmatch(r"[\w.-]+/[\w.-]+", source))


# -----------------------------------------------------------------------------
# Sources -> pairs

def iter_pairs(source: str, split: str = "train", stats: DataStats | None = None) -> Iterator[Pair]:
    """Stream the pairs of one source. The files are found now (errors show at once), read lazily."""
    stats = stats if stats is not None else DataStats()
    if source == "demo":
        if split not in DEMO_SIZES:
            raise UserError(f"demo: no '{split}' split; available splits: {', '.join(DEMO_SIZES)}")
        names, fetch, read = [split], (lambda s: s), _demo_rows
    elif _is_local(source):
        names, fetch, read = _local_files(source, split), (lambda f: f), _read_file
    else:
        names, fetch = _hub_files(source, split)  # fetch downloads a shard when it is reached
        read = _read_file

    def generate():
        for name in names:
            for row in read(fetch(name)):
                pair = make_pair(row, source, stats)
                if pair is not None:
                    yield pair
    return generate()


def load_pairs(sources: str | list[str], split: str = "train", max_samples: int | None = None,
               stats: DataStats | None = None) -> list[Pair]:
    """Pairs of one or several sources ("a,b" or a list), interleaved round-robin so that
    max_samples takes from all of them; each Pair keeps its source. The first max_samples in file
    order, not a random sample: batch_order shuffles."""
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    if not sources:
        raise UserError("no data source given; name a Hub dataset, a local file/directory, or demo")
    stats = stats if stats is not None else DataStats()
    active = [iter_pairs(s, split, stats) for s in sources]
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
# Tokenizer

class Tokenizer:
    """A thin wrapper over tokenizers.Tokenizer that knows its eos and pad ids."""

    def __init__(self, tok, eos_token: str, pad_token: str, config: dict | None = None):
        self.tok = tok
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id, self.pad_id = tok.token_to_id(eos_token), tok.token_to_id(pad_token)
        if self.eos_id is None or self.pad_id is None:
            raise UserError(f"tokenizer: eos {eos_token!r} or pad {pad_token!r} is not in the vocabulary; "
                            f"fix eos_token/pad_token in tokenizer_config.json")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.config = dict(config or {})  # the rest of tokenizer_config.json, written back by save()

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

        def token(key, defaults):  # a string, or {"content": ...} in older configs
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
            return next((t for t in defaults if tok.token_to_id(t) is not None), defaults[0])
        # Qwen3 defaults: post-trained models end turns with <|im_end|>; <|endoftext|> pads
        eos = token("eos_token", ["<|im_end|>", "<|endoftext|>"])
        pad = token("pad_token", ["<|endoftext|>", eos])
        return cls(tok, eos, pad, config)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def save(self, path: str):
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        config = {**self.config, "eos_token": self.eos_token, "pad_token": self.pad_token}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # loadable by transformers too
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


# -----------------------------------------------------------------------------
# Pair -> token ids

@dataclass
class TokenizedPair:
    chosen_ids: list[int]       # kept prompt + chosen response + eos
    rejected_ids: list[int]     # kept prompt + rejected response + eos
    margin: float | None
    source: str
    prompt_len: int             # prompt tokens kept (the same in both)
    chosen_response_len: int    # response tokens, without eos (for eval's length analysis)
    rejected_response_len: int

    @property
    def length(self) -> int:
        """The padded length this pair needs in a batch."""
        return max(len(self.chosen_ids), len(self.rejected_ids))


def _fit(pair: Pair, prompt: list[int], chosen: list[int], rejected: list[int], eos_id: int,
         max_length: int, stats: DataStats) -> TokenizedPair | None:
    if max_length < 2:
        raise UserError(f"max_length {max_length} is too small; use at least 2 (one token + eos)")
    longest = max(len(chosen), len(rejected)) + 1  # + eos
    if longest > max_length:
        stats.dropped_too_long += 1
        return None
    keep = min(len(prompt), max_length - longest)  # same prompt tokens for chosen and rejected
    if keep < len(prompt):
        stats.truncated_prompt += 1
    prompt = prompt[len(prompt) - keep:]           # cut from the left: keep the question's end
    stats.tokenized += 1
    return TokenizedPair(prompt + chosen + [eos_id], prompt + rejected + [eos_id], pair.margin, pair.source,
                         len(prompt), len(chosen), len(rejected))


def tokenize_pair(tok: Tokenizer, pair: Pair, max_length: int,
                  stats: DataStats | None = None) -> TokenizedPair | None:
    """prompt + response + eos for both responses; None if a response does not fit (counted)."""
    stats = stats if stats is not None else DataStats()
    return _fit(pair, tok.encode(pair.prompt), tok.encode(pair.chosen), tok.encode(pair.rejected),
                tok.eos_id, max_length, stats)


def tokenize_pairs(pairs: list[Pair], tok: Tokenizer, max_length: int,
                   stats: DataStats | None = None) -> list[TokenizedPair]:
    """tokenize_pair over many pairs, encoding in batches (the tokenizer runs them in parallel)."""
    stats = stats if stats is not None else DataStats()
    out = []
    for start in range(0, len(pairs), 1024):
        chunk = pairs[start:start + 1024]
        ids = tok.encode_batch([t for p in chunk for t in (p.prompt, p.chosen, p.rejected)])
        for i, pair in enumerate(chunk):
            item = _fit(pair, ids[3 * i], ids[3 * i + 1], ids[3 * i + 2], tok.eos_id, max_length, stats)
            if item is not None:
                out.append(item)
    return out


# -----------------------------------------------------------------------------
# Batching

def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int = 0, shuffle: bool = True,
                window: int = 50) -> list[list[int]]:
    """Indices cut into batches of similar length, every index exactly once, last partial batch kept.

    shuffle=True (training): shuffle with (seed, epoch), sort each window of `window` batches by
    length, cut into batches, shuffle the batch order: random enough, little padding, and the same
    for the same seed and epoch. shuffle=False (evaluation): all sorted by length, longest first,
    so a batch too big for memory fails at once."""
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
    for start in range(0, n, batch_size * window):
        chunk = sorted(order[start:start + batch_size * window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_margins(items: list[TokenizedPair]):
    """(B,) float32 margins when any pair of the batch has one (a missing margin counts as 0), else None."""
    margins = [it.margin for it in items]
    if not any(m is not None for m in margins):
        return None
    return torch.tensor([0.0 if m is None else m for m in margins], dtype=torch.float32)


def collate(items: list[TokenizedPair], pad_id: int, *, share_prompt: bool = False) -> dict:
    """B pairs -> input_ids/attention_mask (2B, T): rows 0..B-1 chosen, rows B..2B-1 rejected, right-padded
    with pad_id.

    margin: (B,) floats when any pair has one (a missing margin counts as 0), else None.
    share_prompt=True: input_ids (1, N) hold each pair's prompt once (see collate_packed), and these
    padded rows become the sequence layout that attention alone runs on (causal attention over
    right-padded rows needs no mask, so it keeps the plain fused kernel): expand_index (2B, T),
    keep_index, and sequence_ids (2B, T) / num_sequences in place of attention_mask."""
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for row, ids in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    if not share_prompt:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "margin": batch_margins(items)}
    rows = torch.arange(len(seqs))[:, None].expand(len(seqs), T)
    batch = {"input_ids": input_ids, "sequence_ids": torch.where(attention_mask.bool(), rows, -1),  # as rm.py
             "num_sequences": len(seqs), "margin": batch_margins(items)}
    return share_prompt_layout(batch, items, [k * T for k in range(len(seqs))], pad_id, multiple_of=8)


def collate_packed(items: list[TokenizedPair], pad_id: int, max_tokens: int | None = None,
                   multiple_of: int = 8, *, share_prompt: bool = False) -> dict:
    """B pairs -> padding-free rows: the 2B sequences laid end to end, chosen ones first (sequence k < B
    is pair k's chosen response, B + k its rejected one, as in collate).

    max_tokens None: ONE row holding every token (for varlen attention, whose cost grows with the
    tokens only). max_tokens N: rows of at most N tokens, filled first-fit in decreasing length (for
    the dense block-diagonal mask, whose cost grows with the square of a row's length). Rows are
    padded to a common length, a multiple of `multiple_of`; the padding of a row is a dummy segment
    with its own positions, so it attends only to itself and never to a real token.

    Returns input_ids (R, L); position_ids (R, L) restarting at 0 for every sequence; sequence_ids
    (R, L), -1 on padding; num_sequences 2B; cu_seqlens (S+1,) int32, the segment boundaries over the
    flattened rows (each sequence and each row's padding is a segment); max_seqlen, the longest
    segment; margin as in collate.

    share_prompt=True: a pair's chosen and rejected sequences begin with the same prompt, and under a
    causal mask those prompt tokens get the same hidden states in both. So compute them once: the
    model's input becomes ONE row of tokens, per pair [prompt, chosen tail, rejected tail], with the
    rejected tail's positions continuing from the prompt's. Only attention needs the two sequences
    apart (the rejected tail must not see the chosen one): it copies the prompt's q/k/v into both
    sequences, runs on the rows above (the "sequence layout"), and each token takes its output back
    from one copy. Returns then input_ids, position_ids (1, N): the tokens; expand_index (R, L): for
    each position of the sequence layout, the token it copies; keep_index (N,): for each token, the
    position of the sequence layout whose attention output it takes; expanded_position_ids (R, L):
    the positions of the sequence layout; sequence_ids, cu_seqlens, max_seqlen, num_sequences, margin
    as above (of the sequence layout: pooling reads the hidden states copied into it). Projections,
    MLPs and norms, most of the work, see every prompt token once instead of twice."""
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    longest = max(len(s) for s in seqs)
    budget = max(max_tokens or 0, longest) if max_tokens else sum(len(s) for s in seqs)
    rows, room = [], []                                        # rows: lists of sequence indices
    for k in sorted(range(len(seqs)), key=lambda k: -len(seqs[k])):
        r = next((r for r in range(len(rows)) if room[r] >= len(seqs[k])), None)
        if r is None:                                          # no row has room: open a new one
            rows.append([])
            room.append(budget)
            r = len(rows) - 1
        rows[r].append(k)
        room[r] -= len(seqs[k])
    for row in rows:
        row.sort()                                             # a stable, readable layout
    L = max(sum(len(seqs[k]) for k in row) for row in rows)
    L = -(-L // multiple_of) * multiple_of
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), L), dtype=torch.long)
    sequence_ids = torch.full((len(rows), L), -1, dtype=torch.long)
    segments, start = [], [0] * len(seqs)                     # start[k]: sequence k's first flat position
    for r, row in enumerate(rows):
        t = 0
        for k in row:
            n = len(seqs[k])
            input_ids[r, t:t + n] = torch.tensor(seqs[k], dtype=torch.long)
            position_ids[r, t:t + n] = torch.arange(n)
            sequence_ids[r, t:t + n] = k
            segments.append(n)
            start[k] = r * L + t
            t += n
        if t < L:                                              # the padding tail: one dummy segment
            position_ids[r, t:] = torch.arange(L - t)
            segments.append(L - t)
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "sequence_ids": sequence_ids,
             "num_sequences": len(seqs), "cu_seqlens": cu_seqlens, "max_seqlen": max(segments),
             "margin": batch_margins(items)}
    return share_prompt_layout(batch, items, start, pad_id, multiple_of) if share_prompt else batch


def shared_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences have in common (the prompt, at least)."""
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def share_prompt_layout(batch: dict, items: list[TokenizedPair], start: list[int], pad_id: int,
                        multiple_of: int) -> dict:
    """A batch of collate or collate_packed (the "sequence layout") -> the same batch whose input_ids hold
    each pair's shared prefix once. start[k]: where sequence k begins in the flattened sequence layout.

    Example, one pair: chosen [p q a], rejected [p q b c] (prompt p q), sequence layout one packed row
    [p q a | p q b c]. Tokens: [p q a b c], positions [0 1 2 2 3]. expand_index = [0 1 2 0 1 3 4] (the
    token each position of the sequence layout copies), keep_index = [0 1 2 5 6] (the position of the
    sequence layout whose attention output each token takes: the prompt from the chosen copy)."""
    B = len(items)
    ids, positions, keep = [], [], []
    token_of = [None] * (2 * B)            # token_of[k][j]: the token that is sequence k's j-th
    for i, it in enumerate(items):
        n_shared, n_chosen, n_rejected = (shared_prefix_len(it.chosen_ids, it.rejected_ids),
                                          len(it.chosen_ids), len(it.rejected_ids))
        offset = len(ids)                                                      # this pair's first token
        ids += it.chosen_ids + it.rejected_ids[n_shared:]                      # prompt, chosen tail, rejected tail
        positions += list(range(n_chosen)) + list(range(n_shared, n_rejected))
        token_of[i] = list(range(offset, offset + n_chosen))
        token_of[B + i] = list(range(offset, offset + n_shared)) + \
            list(range(offset + n_chosen, offset + n_chosen + n_rejected - n_shared))
        keep += [start[i] + j for j in range(n_chosen)] + [start[B + i] + j for j in range(n_shared, n_rejected)]
    n = len(ids)
    padded = -(-n // multiple_of) * multiple_of
    input_ids = torch.full((1, padded), pad_id, dtype=torch.long)
    input_ids[0, :n] = torch.tensor(ids, dtype=torch.long)
    position_ids = torch.zeros((1, padded), dtype=torch.long)
    position_ids[0, :n] = torch.tensor(positions, dtype=torch.long)
    position_ids[0, n:] = torch.arange(padded - n)
    # Padding, in either layout, copies / reads position 0: its values never reach a reward.
    expand_index = torch.zeros(batch["sequence_ids"].numel(), dtype=torch.long)
    for k, tokens in enumerate(token_of):
        expand_index[start[k]:start[k] + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    keep_index = torch.zeros(padded, dtype=torch.long)
    keep_index[:n] = torch.tensor(keep, dtype=torch.long)
    return {**batch, "input_ids": input_ids, "position_ids": position_ids,
            "expand_index": expand_index.view_as(batch["sequence_ids"]), "keep_index": keep_index,
            "expanded_position_ids": batch.get("position_ids")}  # None: padded rows (collate)


def padding_fraction(batches: list[list[TokenizedPair]]) -> float:
    """Share of pad positions if these batches (lists of pairs, as given to collate) were collated."""
    real = total = 0
    for items in batches:
        lens = [len(it.chosen_ids) for it in items] + [len(it.rejected_ids) for it in items]
        real += sum(lens)
        total += max(lens) * len(lens)
    return 1.0 - real / total if total else 0.0


# -----------------------------------------------------------------------------
# The offline demo task
#
# The human asks about one of 16 topics (cats, chess, volcanoes, ...), sometimes with a follow-up
# turn ("what else?") after a first answer on the same topic. The chosen response is polite AND on
# the asked topic. The rejected one is either polite but about ANOTHER topic (half the pairs:
# only the prompt tells which response is right) or on topic but rude (the other half). Both
# responses come from the same templates, so length says nothing. Generalisation: the test split
# asks with (topic, question template) combinations never seen in training, from its own seed.
# Rudeness alone gives 75%; the rest needs the prompt. Checked with a throwaway 2-layer, hidden-64
# Qwen3-style model (4 heads, q/k norm, RoPE) and a mean-pooled MLP head, from scratch, AdamW,
# 32 pairs per step, 2 CPU cores: held-out accuracy 0.90 after ~625 steps (35 s; lr 1e-3 or 3e-3)
# and 0.97 after ~1000 steps (60 s).

DEMO_SIZES = {"train": 4000, "test": 500}
DEMO_TOPICS = [  # (what the human asks about, words an answer on that topic uses)
    ("cats", "kitten whiskers purring fur litter"),
    ("dogs", "puppy leash barking fetch collar"),
    ("baking", "bread oven flour dough yeast"),
    ("gardening", "soil seeds tomatoes compost watering"),
    ("astronomy", "stars planets telescope orbit galaxy"),
    ("chess", "knight bishop checkmate pawns openings"),
    ("guitar", "strings chords frets strumming amplifier"),
    ("running", "marathon sneakers pace stretching endurance"),
    ("coffee", "espresso beans roasting grinder caffeine"),
    ("oceans", "waves tides coral salt whales"),
    ("photography", "camera lens aperture exposure tripod"),
    ("volcanoes", "lava magma eruption crater ash"),
    ("painting", "canvas brushes colors palette acrylic"),
    ("cycling", "bicycle gears helmet pedals saddle"),
    ("swimming", "pool goggles strokes laps diving"),
    ("weather", "rain clouds thunder forecast humidity"),
]
DEMO_QUESTIONS = [
    "can you tell me about {s}?", "what should i know about {s}?",
    "i want to learn about {s}. where do i start?", "any tips on {s}?", "could you explain {s} to me?",
    "i am curious about {s}. what is interesting about it?", "what do you think about {s}?",
    "please give me some advice about {s}.", "my friend loves {s}. what can you tell me?",
    "help me understand {s}, please.",
]
DEMO_FIRST_ANSWERS = ["{a} is a good place to start.", "people often begin with {a} and {b}."]
DEMO_FOLLOW_UPS = ["tell me more.", "what else?", "interesting, go on.", "can you say more about that?"]
DEMO_BODIES = [
    "{s} is a wonderful subject. start with {a} and {b}, then learn about {c}.",
    "most people who enjoy {s} care about {a}. {b} and {c} matter too.",
    "the key ideas are {a}, {b} and {c}.",
    "when it comes to {s}, {a} is important. also think about {b}.",
    "a good first step is {a}. after that, practice with {b} and {c}.",
    "{a} and {b} are the heart of {s}.",
    "experts in {s} often talk about {a} and {b}.",
    "i would focus on {a} first, and then on {c}.",
]
DEMO_POLITE = (["sure!", "great question!", "happy to help.", "of course.", "good question!", "glad you asked."],
               ["i hope this helps!", "let me know if you have more questions.", "have fun!", "enjoy learning!",
                "good luck!"])
DEMO_RUDE = (["ugh.", "seriously?", "whatever.", "what a stupid question.", "not this again.", "boring."],
             ["now go away.", "figure out the rest yourself.", "do not bother me again.",
              "this is a waste of my time.", "stop asking me things."])
DEMO_SPECIAL = ["<|endoftext|>", "<|im_end|>", "<unk>"]  # pad, eos, unknown


def _demo_answer(rng: random.Random, topic: int, style: tuple[list[str], list[str]]) -> str:
    subject, words = DEMO_TOPICS[topic]
    a, b, c = rng.sample(words.split(), 3)
    text = rng.choice(style[0]) + " " + rng.choice(DEMO_BODIES).format(s=subject, a=a, b=b, c=c)
    if rng.random() < 0.8:
        text += " " + rng.choice(style[1])
    return " " + text  # hh-rlhf responses start with a space after "Assistant:"


def _demo_rows(split: str) -> Iterator[dict]:
    """hh-rlhf-style transcripts {"chosen", "rejected"}, generated lazily and deterministically."""
    rng = random.Random(f"demo/{split}")
    made = 0
    while made < DEMO_SIZES[split]:
        topic, question = rng.randrange(len(DEMO_TOPICS)), rng.randrange(len(DEMO_QUESTIONS))
        if ((3 * topic + question) % 5 == 0) != (split == "test"):  # held-out combinations
            continue
        subject, words = DEMO_TOPICS[topic]
        prompt = "\n\nHuman: " + DEMO_QUESTIONS[question].format(s=subject)
        if rng.random() < 0.25:  # a second turn about the same topic
            a, b = rng.sample(words.split(), 2)
            prompt += (ASSISTANT + " " + rng.choice(DEMO_FIRST_ANSWERS).format(a=a, b=b)
                       + "\n\nHuman: " + rng.choice(DEMO_FOLLOW_UPS))
        prompt += ASSISTANT
        chosen = _demo_answer(rng, topic, DEMO_POLITE)
        if rng.random() < 0.5:
            other = rng.choice([t for t in range(len(DEMO_TOPICS)) if t != topic])
            rejected = _demo_answer(rng, other, DEMO_POLITE)
        else:
            rejected = _demo_answer(rng, topic, DEMO_RUDE)
        made += 1
        yield {"chosen": prompt + chosen, "rejected": prompt + rejected}


def _demo_pre_tokenizer():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def demo_tokenizer() -> Tokenizer:
    """A word-level tokenizer covering every word the demo generator can write (a few hundred)."""
    from tokenizers import Tokenizer as HFTokenizer, models
    pre = _demo_pre_tokenizer()
    texts = ["Human: Assistant:"] + [s + " " + w for s, w in DEMO_TOPICS]
    texts += DEMO_QUESTIONS + DEMO_FIRST_ANSWERS + DEMO_FOLLOW_UPS + DEMO_BODIES
    texts += DEMO_POLITE[0] + DEMO_POLITE[1] + DEMO_RUDE[0] + DEMO_RUDE[1]
    words = set()
    for text in texts:
        text = re.sub(r"\{\w\}", " ", text)  # drop the template slots
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate(DEMO_SPECIAL + sorted(words))}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(DEMO_SPECIAL)
    return Tokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", config={"model_max_length": 256})


# -----------------------------------------------------------------------------
# `python data.py SOURCE`: read a source, report the counts and what it cost in memory

def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise UserError(f"can't read {field} from /proc/self/status; memory reporting needs Linux")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stream a preference data source; print what was read, "
                                                 "skipped and kept, and the peak memory growth.")
    parser.add_argument("source", help="demo, a Hub dataset id, or a local file/directory/glob")
    parser.add_argument("--split", default="train", help="train or test (default: train)")
    parser.add_argument("--max-samples", type=int, default=None, help="stop after this many pairs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    try:  # reset the peak RSS counter (Linux >= 4.0) so that VmHWM measures only the reading
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _rss_mib("VmRSS")
    stats = DataStats()
    for n, _ in enumerate(iter_pairs(args.source, args.split, stats), 1):
        if args.max_samples is not None and n >= args.max_samples:
            break
    print(json.dumps(stats.report(), indent=1))
    print(f"peak RSS growth while reading: {_rss_mib('VmHWM') - before:.1f} MiB")


if __name__ == "__main__":
    run_cli(main)
