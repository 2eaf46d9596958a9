"""Tests for data.py, support/readers.py, support/tokenizer.py, support/hub.py's dataset files, support/demo.py and
tools/inspect_data.py: every expectation is written out by hand, no network."""
import gzip
import json
import os
import random
import re
import subprocess
import time
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from support import demo  # noqa: E402
from support import hub  # noqa: E402
from support import readers  # noqa: E402
from support.tokenizer import Tokenizer  # noqa: E402
from data import DataStats, Pair, TokenizedPair  # noqa: E402
from support.errors import UserError  # noqa: E402

H, A = "\n\nHuman:", "\n\nAssistant:"


def write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return str(path)


def write_lines(path, lines: list[bytes]):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def as_tuples(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def read(source, split="train"):
    stats = DataStats()
    pairs = list(data.iter_pairs(source, split, stats))
    assert stats.read == stats.kept + sum(stats.skipped.values())  # every row accounted for
    return pairs, stats


# -----------------------------------------------------------------------------
# hh-rlhf layout: whole transcripts in chosen/rejected

HH_ROWS = [  # (chosen, rejected)
    (f"{H} Hi there{A} Hello! How can I help?", f"{H} Hi there{A} Go away."),
    # multi-turn, the responses share their start: the prompt still ends at the last "Assistant:"
    (f"{H} What is 2+2?{A} 4.{H} And 3+3?{A} Sure, it is 6.", f"{H} What is 2+2?{A} 4.{H} And 3+3?{A} Sure, it is 7."),
    (f"{H} C'est quoi «café» ☕?{A} Du café ☕.", f"{H} C'est quoi «café» ☕?{A} Je ne sais pas 🤷."),
    # differ before the last turn: the responses hold the later turns
    (f"{H} Tell me a joke{A} Why did the chicken cross the road?{H} Why?{A} To get to the other side.",
     f"{H} Tell me a joke{A} No.{H} Why?{A} Because."),
    (f"{H} A{A} B", f"{H} C{A} D"),             # no shared "Assistant:" -> no shared prompt
    (f"{H} Same{A} same", f"{H} Same{A} same"),  # chosen == rejected
    (None, f"{H} x{A} y"),                       # null -> empty field
    (f"{H} x{A} y", ""),                          # empty -> empty field
    (f"{H} Hi{A} Hello", f"{H} Hi{A}"),          # nothing after "Assistant:" -> empty response
]
HH_PAIRS = [
    (f"{H} Hi there{A}", " Hello! How can I help?", " Go away."),
    (f"{H} What is 2+2?{A} 4.{H} And 3+3?{A}", " Sure, it is 6.", " Sure, it is 7."),
    (f"{H} C'est quoi «café» ☕?{A}", " Du café ☕.", " Je ne sais pas 🤷."),
    (f"{H} Tell me a joke{A}", f" Why did the chicken cross the road?{H} Why?{A} To get to the other side.",
     f" No.{H} Why?{A} Because."),
]
HH_SKIPPED = {"no shared prompt": 1, "chosen == rejected": 1, "empty field": 2, "empty response": 1}


def test_hh_parquet(tmp_path):
    path = write_parquet(tmp_path / "hh.parquet", {"chosen": [c for c, _ in HH_ROWS], "rejected": [r for _, r in HH_ROWS]})
    pairs, stats = read(path)
    assert as_tuples(pairs) == HH_PAIRS
    assert all(p.source == path and p.margin is None for p in pairs)
    assert (stats.read, stats.kept, stats.skipped) == (9, 4, HH_SKIPPED)
    assert stats.sources == {path: 4}


def test_hh_jsonl_gz_with_corrupt_lines(tmp_path):
    lines = [json.dumps({"chosen": c, "rejected": r}, ensure_ascii=False).encode() for c, r in HH_ROWS]
    lines[2:2] = [b'{"chosen": "\\n\\nHuman: oops', b"", b"[1, 2]", b'{"chosen": 5, "rejected": "x"}', b"\xff\xfe{}"]
    path = write_lines(tmp_path / "hh.jsonl.gz", lines)
    pairs, stats = read(path)
    assert as_tuples(pairs) == HH_PAIRS  # reading went on past the bad lines
    skipped = {**HH_SKIPPED, "unparsable line": 2, "not an object": 1, "not a string": 1}
    assert (stats.read, stats.kept, stats.skipped) == (13, 4, skipped)  # the blank line is not a row


# -----------------------------------------------------------------------------
# rm-static / full-hh-rlhf layout: prompt, response, chosen, rejected

P1, P2 = f"{H} Hi{A}", f"{H} Ça va? 日本語{A}"
RM_COLUMNS = {
    "prompt": [P1, P2, P1, None, P1, P1],
    "response": ["r"] * 6,
    "chosen": [" Hello.", " Oui, ça va 😀", P1 + " whole A", " a", "   ", " same"],
    "rejected": [" Bye.", " Non.", P1 + " whole B", " b", " c", " same"],
}


def test_rm_static_parquet(tmp_path):
    path = write_parquet(tmp_path / "rm.parquet", RM_COLUMNS)
    pairs, stats = read(path)
    # whole texts (row 3) lose the repeated prompt; the response column is not read
    assert as_tuples(pairs) == [(P1, " Hello.", " Bye."), (P2, " Oui, ça va 😀", " Non."), (P1, " whole A", " whole B")]
    assert (stats.read, stats.kept, stats.skipped) == (6, 3, {"empty field": 2, "chosen == rejected": 1})


def test_margin_is_carried_and_collated(tmp_path):
    path = write_parquet(tmp_path / "m.parquet", {"prompt": [P1, P1, P1, P1], "chosen": [" a", " b", " c", " d"],
                                                 "rejected": [" x", " y", " z", " w"],
                                                 "margin": [1.5, None, 0.0, float("nan")]})
    pairs, stats = read(path)
    assert [p.margin for p in pairs] == [1.5, None, 0.0]
    assert stats.skipped == {"bad margin": 1}
    tok = demo.demo_tokenizer()
    items = data.tokenize_pairs(pairs, tok, 64)
    assert data.collate(items, tok.pad_id).margin.tolist() == [1.5, 0.0, 0.0]  # missing margin -> 0


def test_json_list_and_json_lines(tmp_path):
    rows = [{"prompt": P1, "chosen": " a", "rejected": " b"}, {"prompt": P2, "chosen": " c", "rejected": " d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    expected = [(P1, " a", " b"), (P2, " c", " d")]
    assert as_tuples(read(str(tmp_path / "list.json"))[0]) == expected
    assert as_tuples(read(str(tmp_path / "lines.json"))[0]) == expected


def make_split_dir(root):
    os.makedirs(root / "sub")
    write_parquet(root / "train-00000-of-00001.parquet", {"prompt": [P1], "chosen": [" t1"], "rejected": [" r1"]})
    write_lines(root / "sub" / "train.jsonl", [json.dumps({"prompt": P1, "chosen": " t2", "rejected": " r2"}).encode()])
    write_lines(root / "test.jsonl.gz", [json.dumps({"prompt": P1, "chosen": " e1", "rejected": " r3"}).encode()])
    (root / "README.md").write_text("not data")
    return str(root)


def test_directory_with_splits_and_glob(tmp_path):
    root = make_split_dir(tmp_path / "d")
    assert [p.chosen for p in read(root, "train")[0]] == [" t2", " t1"]  # sorted: sub/train.jsonl, train-...
    assert [p.chosen for p in read(root, "test")[0]] == [" e1"]
    with pytest.raises(UserError, match=r"no 'validation' split .* available splits: test, train"):
        data.iter_pairs(root, "validation")
    # a glob is taken as given, whatever the split
    assert [p.chosen for p in read(os.path.join(root, "**", "*.jsonl*"), "test")[0]] == [" t2", " e1"]


def test_directory_without_split_names_is_read_whole(tmp_path):
    root = tmp_path / "plain"
    os.makedirs(root)
    write_lines(root / "b.jsonl", [json.dumps({"prompt": P1, "chosen": " b", "rejected": " x"}).encode()])
    write_parquet(root / "a.parquet", {"prompt": [P1], "chosen": [" a"], "rejected": [" x"]})
    assert [p.chosen for p in read(str(root), "test")[0]] == [" a", " b"]


def test_load_pairs_interleaves_sources(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", {"prompt": [P1] * 5, "chosen": [f" a{i}" for i in range(5)], "rejected": [" x"] * 5})
    b = write_parquet(tmp_path / "b.parquet", {"prompt": [P1] * 2, "chosen": [" b0", " b1"], "rejected": [" x"] * 2})
    assert [p.chosen for p in data.load_pairs([a, b], max_samples=3)] == [" a0", " b0", " a1"]
    stats = DataStats()
    pairs = data.load_pairs(f"{a},{b}", stats=stats)
    assert [p.chosen for p in pairs] == [" a0", " b0", " a1", " b1", " a2", " a3", " a4"]
    assert [p.source for p in pairs[:2]] == [a, b]
    assert stats.sources == {a: 5, b: 2}


def test_make_pair_returns_the_skip_reason_and_dataset_files_fetches_local_paths(tmp_path):
    assert data.make_pair({"chosen": f"{H} x{A} y", "rejected": f"{H} x{A} y"}, "s") == readers.Skip("chosen == rejected")
    assert data.make_pair({"prompt": P1, "chosen": " a", "rejected": " b", "margin": "big"}, "s") == readers.Skip("bad margin")
    assert data.make_pair({"prompt": P1, "chosen": " a", "rejected": " b", "margin": 2}, "s") == Pair(P1, " a", " b", 2.0, "s")
    stats = DataStats()
    for row in (readers.Skip("unparsable line"), Pair(P1, " a", " b", source="s")):
        stats.count(row)
    assert (stats.read, stats.kept, stats.skipped, stats.sources) == (2, 1, {"unparsable line": 1}, {"s": 1})
    root = make_split_dir(tmp_path / "d")
    names, fetch = hub.dataset_files(root, "test")
    assert names == [os.path.join(root, "test.jsonl.gz")] and fetch(names[0]) == names[0]


# -----------------------------------------------------------------------------
# User errors name the path and the fix

def test_user_errors(tmp_path):
    bad_cols = write_parquet(tmp_path / "qa.parquet", {"question": ["q"], "answer": ["a"]})
    with pytest.raises(UserError, match=re.escape(f"{bad_cols}: has columns ['answer', 'question'], expected prompt, chosen, rejected")):
        list(data.iter_pairs(bad_cols))
    bad_json = write_lines(tmp_path / "qa.jsonl", [b'{"question": "q"}'])
    with pytest.raises(UserError, match=re.escape(f"{bad_json}: has columns ['question'], expected")):
        list(data.iter_pairs(bad_json))
    with pytest.raises(UserError, match="nope.parquet: no such file or directory"):
        data.iter_pairs(str(tmp_path / "nope.parquet"))
    (tmp_path / "pairs.csv").write_text("chosen,rejected\n")
    with pytest.raises(UserError, match=r"pairs.csv: unsupported file type; use .parquet, .jsonl, .jsonl.gz or .json"):
        data.iter_pairs(str(tmp_path / "pairs.csv"))
    with pytest.raises(UserError, match=r"\*.parquet: the pattern matches no files"):
        data.iter_pairs(str(tmp_path / "empty" / "*.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=r"junk.parquet: not a readable parquet file"):
        list(data.iter_pairs(str(tmp_path / "junk.parquet")))
    good = write_parquet(tmp_path / "good.parquet", {"chosen": [f"{H} x{A} y"] * 100, "rejected": [f"{H} x{A} z"] * 100})
    (tmp_path / "cut.parquet").write_bytes(open(good, "rb").read()[:-40])  # truncated footer
    with pytest.raises(UserError, match=r"cut.parquet: not a readable parquet file"):
        list(data.iter_pairs(str(tmp_path / "cut.parquet")))
    gz = gzip.compress(b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(UserError, match=r"cut.jsonl.gz: can't read it to the end .* corrupt or truncated"):
        list(data.iter_pairs(str(tmp_path / "cut.jsonl.gz")))
    with pytest.raises(UserError, match="no usable pairs in .*empty field"):
        data.load_pairs(write_parquet(tmp_path / "blank.parquet", {"chosen": [""], "rejected": ["x"]}))
    with pytest.raises(UserError, match="demo: no 'dev' split; available splits: train, test"):
        data.iter_pairs("demo", "dev")


# -----------------------------------------------------------------------------
# Hub datasets from the HF cache, offline

SHA_MAIN, SHA_PARQUET, SHA_OLD = "a" * 40, "b" * 40, "c" * 40


def cache_file(cache, repo, commit, relpath, write):
    """Place a file as huggingface_hub does: the bytes in blobs/, a relative link in snapshots/."""
    repo_dir = cache / ("datasets--" + repo.replace("/", "--"))
    blob = repo_dir / "blobs" / f"{abs(hash((commit, relpath))):x}"
    os.makedirs(blob.parent, exist_ok=True)
    write(blob)
    link = repo_dir / "snapshots" / commit / relpath
    os.makedirs(link.parent, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)


def set_ref(cache, repo, revision, commit):
    ref = cache / ("datasets--" + repo.replace("/", "--")) / "refs" / revision
    os.makedirs(ref.parent, exist_ok=True)
    ref.write_text(commit)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A HF cache with Dahoas/rm-static (data/{split}-*.parquet on main) and Anthropic/hh-rlhf
    (jsonl.gz on main, the parquet conversion on refs/convert/parquet), and offline mode on."""
    cache = tmp_path / "hub"
    rm = lambda chosen: lambda p: write_parquet(p, {"prompt": [P1], "response": ["r"], "chosen": [chosen], "rejected": [" no"]})  # noqa: E731
    cache_file(cache, "Dahoas/rm-static", SHA_MAIN, "data/train-00000-of-00001-1a2b.parquet", rm(" train"))
    cache_file(cache, "Dahoas/rm-static", SHA_MAIN, "data/test-00000-of-00001-3c4d.parquet", rm(" test"))
    cache_file(cache, "Dahoas/rm-static", SHA_MAIN, "README.md", lambda p: p.write_text("card"))
    set_ref(cache, "Dahoas/rm-static", "main", SHA_MAIN)
    hh = lambda answer: lambda p: write_parquet(p, {"chosen": [f"{H} q{A} {answer}"], "rejected": [f"{H} q{A} bad"]})  # noqa: E731
    cache_file(cache, "Anthropic/hh-rlhf", SHA_PARQUET, "default/test/0000.parquet", hh("p0"))
    cache_file(cache, "Anthropic/hh-rlhf", SHA_PARQUET, "default/test/0001.parquet", hh("p1"))
    set_ref(cache, "Anthropic/hh-rlhf", "refs/convert/parquet", SHA_PARQUET)  # -> refs/refs/convert/parquet
    # an older conversion no ref points at any more, touched last: the refs must win over mtimes
    cache_file(cache, "Anthropic/hh-rlhf", SHA_OLD, "default/test/0000.parquet", hh("stale"))
    snapshots = cache / "datasets--Anthropic--hh-rlhf" / "snapshots"
    os.utime(snapshots / SHA_OLD, (os.stat(snapshots / SHA_PARQUET).st_mtime + 60,) * 2)
    cache_file(cache, "Anthropic/hh-rlhf", SHA_MAIN, "harmless-base/test.jsonl.gz",
               lambda p: write_lines(p, [json.dumps({"chosen": f"{H} q{A} json", "rejected": f"{H} q{A} bad"}).encode()]))
    set_ref(cache, "Anthropic/hh-rlhf", "main", SHA_MAIN)
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # it is read at import time
    return cache


def test_hub_cache_layout_matches_huggingface_hub(hf_cache):
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache("Anthropic/hh-rlhf", "default/test/0000.parquet", cache_dir=str(hf_cache),
                                   revision="refs/convert/parquet", repo_type="dataset")
    assert found == str(hf_cache / "datasets--Anthropic--hh-rlhf" / "snapshots" / SHA_PARQUET / "default/test/0000.parquet")
    assert try_to_load_from_cache("Dahoas/rm-static", "data/test-00000-of-00001-3c4d.parquet", cache_dir=str(hf_cache),
                                  repo_type="dataset") is not None


def test_hub_offline_reads_the_cache(hf_cache):
    assert as_tuples(read("Dahoas/rm-static", "test")[0]) == [(P1, " test", " no")]
    assert [p.chosen for p in read("Dahoas/rm-static", "train")[0]] == [" train"]
    pairs, _ = read("Anthropic/hh-rlhf", "test")  # the parquet conversion wins over main's jsonl.gz
    assert as_tuples(pairs) == [(f"{H} q{A}", " p0", " bad"), (f"{H} q{A}", " p1", " bad")]
    assert pairs[0].source == "Anthropic/hh-rlhf"
    with pytest.raises(UserError, match=r"Dahoas/rm-static: no 'validation' split in the HF cache .* available splits: test, train"):
        data.iter_pairs("Dahoas/rm-static", "validation")
    with pytest.raises(UserError, match=r"Dahoas/full-hh-rlhf: HF_HUB_OFFLINE is set and nothing of it is in the HF cache "
                                        r".*run once online.* HF_HUB_CACHE"):
        data.iter_pairs("Dahoas/full-hh-rlhf", "test")


def test_hub_offline_env_set_after_import_never_touches_network(hf_cache, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if set after import
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda *a, **k: pytest.fail("went online"))
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("went online"))
    assert [p.chosen for p in read("Dahoas/rm-static", "test")[0]] == [" test"]


def test_hub_listing_failure_falls_back_to_cache(hf_cache, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    assert [p.chosen for p in read("Dahoas/rm-static", "test")[0]] == [" test"]
    with pytest.raises(UserError, match=r"Dahoas/full-hh-rlhf: listing it on the Hub failed \(ConnectionError"):
        data.iter_pairs("Dahoas/full-hh-rlhf", "test")


def test_hub_online_picks_shards(hf_cache, monkeypatch, tmp_path):
    """Online: main's data/{split}-* parquet for Dahoas; hh-rlhf's parquet conversion, every shard."""
    import huggingface_hub
    listings = {
        ("Dahoas/rm-static", None): ["README.md", "data/test-00000-of-00001-3c4d.parquet",
                                     "data/train-00000-of-00002-1a2b.parquet", "data/train-00001-of-00002-5e6f.parquet"],
        ("Anthropic/hh-rlhf", None): [".gitattributes", "README.md", "harmless-base/test.jsonl.gz", "harmless-base/train.jsonl.gz"],
        ("Anthropic/hh-rlhf", "refs/convert/parquet"): ["default/test/0000.parquet", "default/train/0000.parquet",
                                                        "default/train/0001.parquet"],
    }
    downloads = []

    def download(repo, filename, repo_type, revision, cache_dir):
        downloads.append((repo, filename, revision))
        return write_parquet(tmp_path / f"dl{len(downloads)}.parquet", {"chosen": [f"{H} q{A} {filename}"], "rejected": [f"{H} q{A} x"]})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo, repo_type: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo, repo_type, revision=None: listings[(repo, revision)])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert [p.chosen for p in read("Dahoas/rm-static", "train")[0]] == [
        " data/train-00000-of-00002-1a2b.parquet", " data/train-00001-of-00002-5e6f.parquet"]
    assert [p.chosen for p in read("Anthropic/hh-rlhf", "train")[0]] == [" default/train/0000.parquet", " default/train/0001.parquet"]
    assert downloads[-1] == ("Anthropic/hh-rlhf", "default/train/0001.parquet", "refs/convert/parquet")
    with pytest.raises(UserError, match=r"Anthropic/hh-rlhf: no 'dev' split on the Hub; available splits: test, train"):
        data.iter_pairs("Anthropic/hh-rlhf", "dev")


# -----------------------------------------------------------------------------
# Streaming: memory does not grow with the file

def write_random_parquet(path, n, size=1000, rows_per_group=2000):
    """n pairs of 3 x `size` bytes of random text (incompressible, no dictionary), in row groups of 2000."""
    rng = np.random.default_rng(0)
    offsets = pa.py_buffer(np.arange(0, (rows_per_group + 1) * size, size, dtype=np.int32))
    with pq.ParquetWriter(path, pa.schema([(c, pa.string()) for c in ("prompt", "chosen", "rejected")]),
                          compression="none", use_dictionary=False) as writer:
        for _ in range(n // rows_per_group):
            cols = [pa.StringArray.from_buffers(rows_per_group, offsets,
                                                pa.py_buffer(rng.integers(97, 123, rows_per_group * size, dtype=np.uint8)))
                    for _ in range(3)]
            writer.write_table(pa.table(cols, names=["prompt", "chosen", "rejected"]))
    return os.path.getsize(path) / 2**20


def streaming_growth_mib(path, n) -> float:
    """Peak RSS growth of `python -m tools.inspect_data FILE` (a fresh process) while it streams the file's n pairs."""
    out = subprocess.run([sys.executable, "-m", "tools.inspect_data", path], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert f'"kept": {n}' in out
    return float(re.search(r"peak RSS growth while reading: ([\d.]+) MiB", out).group(1))


def test_parquet_streaming_memory_is_flat(tmp_path):
    """100k pairs of 3 x 1 KB random text (300 MB uncompressed) cost no more memory to stream than 10k do.
    Compared with the small file read the same way, not with a fixed number: what a process's peak RSS
    grows by on its own (allocator pools, a busy machine) is the same for both and cancels out."""
    small_mib = write_random_parquet(tmp_path / "small.parquet", 10_000)
    big_mib = write_random_parquet(tmp_path / "big.parquet", 100_000)
    assert big_mib > 250
    small, big = (streaming_growth_mib(str(tmp_path / f"{name}.parquet"), n) for name, n in (("small", 10_000),
                                                                                           ("big", 100_000)))
    print(f"streaming {small_mib:.0f} / {big_mib:.0f} MiB of parquet: peak RSS growth {small:.1f} / {big:.1f} MiB")
    # 42 and 44 MiB measured; with pyarrow's default pre-buffering the growth follows the file (58 and 320
    # MiB): a reader that holds a quarter of the extra 260 MiB it reads fails
    assert big - small < (big_mib - small_mib) / 4


# -----------------------------------------------------------------------------
# Tokenisation

def tokens(tok, ids):
    return [tok.tok.id_to_token(i) for i in ids]


def test_truncation_keeps_response_end_and_cuts_prompt_from_left():
    tok = demo.demo_tokenizer()
    pair = Pair(f"{H} any tips on cats?{A}", " sure! cats", " ugh. boring.", source="t")
    # prompt: Human : any tips on cats ? Assistant : (9); chosen 3 tokens, rejected 4 tokens
    stats = DataStats()
    full = data.tokenize_pair(tok, pair, 100, stats)
    assert tokens(tok, full.chosen_ids) == ["Human", ":", "any", "tips", "on", "cats", "?", "Assistant", ":",
                                            "sure", "!", "cats", "<|im_end|>"]
    assert (full.prompt_len, full.chosen_response_len, full.rejected_response_len) == (9, 3, 4)
    cut = data.tokenize_pair(tok, pair, 8, stats)  # room for 8 - (4 + eos) = 3 prompt tokens, in both
    assert tokens(tok, cut.chosen_ids) == ["?", "Assistant", ":", "sure", "!", "cats", "<|im_end|>"]
    assert tokens(tok, cut.rejected_ids) == ["?", "Assistant", ":", "ugh", ".", "boring", ".", "<|im_end|>"]
    assert cut.prompt_len == 3 and cut.length == 8
    none = data.tokenize_pair(tok, pair, 5, stats)  # the responses just fit, no prompt left
    assert tokens(tok, none.rejected_ids) == ["ugh", ".", "boring", ".", "<|im_end|>"]
    assert data.tokenize_pair(tok, pair, 4, stats) is None  # the rejected response + eos needs 5
    assert (stats.tokenized, stats.truncated_prompt, stats.dropped_too_long) == (3, 2, 1)
    # the batched path gives the same
    stats2 = DataStats()
    assert data.tokenize_pairs([pair, pair], tok, 8, stats2) == [cut, cut]
    assert data.tokenize_pairs([pair], tok, 4, stats2) == [] and stats2.dropped_too_long == 1


def item(chosen, rejected, margin=None):
    return TokenizedPair(chosen, rejected, margin, "t", 0, len(chosen), len(rejected))


def test_collate_layout():
    batch = data.collate([item([1, 2, 3], [4, 5]), item([6], [7, 8, 9, 10])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0], [6, 0, 0, 0], [4, 5, 0, 0], [7, 8, 9, 10]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    assert batch.margin is None and batch.layout is None
    margin = data.collate([item([1], [2], 2.5), item([3], [4])], pad_id=9).margin
    assert margin.dtype == torch.float32 and margin.tolist() == [2.5, 0.0]


def padding_fraction(batches: list[list[TokenizedPair]]) -> float:
    """Share of pad positions if these batches (lists of pairs, as given to collate) were collated."""
    real = total = 0
    for items in batches:
        lens = [len(it.chosen_ids) for it in items] + [len(it.rejected_ids) for it in items]
        real += sum(lens)
        total += max(lens) * len(lens)
    return 1.0 - real / total if total else 0.0


def test_batch_order_and_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1003)]
    order = data.batch_order(lengths, 8, seed=1, epoch=0)
    assert order == data.batch_order(lengths, 8, seed=1, epoch=0)
    assert order != data.batch_order(lengths, 8, seed=1, epoch=1)
    assert order != data.batch_order(lengths, 8, seed=2, epoch=0)
    assert sorted(i for b in order for i in b) == list(range(1003))
    assert sorted(len(b) for b in order) == [3] + [8] * 125  # the last partial batch is kept
    first_window = [max(lengths[i] for i in b) for b in order[:50]]
    assert first_window != sorted(first_window)  # the batches themselves are shuffled too
    ordered = data.batch_order(lengths, 8, seed=1, shuffle=False)
    assert [lengths[i] for b in ordered for i in b] == sorted(lengths, reverse=True)
    items = [item([1] * n, [1] * max(1, n - 3)) for n in lengths]
    perm = list(range(1003))
    rng.shuffle(perm)
    random_batches = [[items[i] for i in perm[s:s + 8]] for s in range(0, 1003, 8)]
    grouped = padding_fraction([[items[i] for i in b] for b in order])
    assert grouped < 0.1 < 0.4 < padding_fraction(random_batches)
    assert padding_fraction([[item([1, 1], [1, 1, 1, 1])]]) == 0.25  # 2 pads out of 8 positions


# -----------------------------------------------------------------------------
# Demo task and tokenizer

def test_demo_is_deterministic_disjoint_and_follows_its_rule():
    train, test = data.load_pairs("demo", "train"), data.load_pairs("demo", "test")
    assert (len(train), len(test)) == (4000, 500)
    assert as_tuples(train[:50]) == as_tuples(data.load_pairs("demo", "train", max_samples=50))
    first_question = lambda p: p.prompt.split(A)[0]  # noqa: E731 - topic + question template
    assert not {first_question(p) for p in train} & {first_question(p) for p in test}  # unseen combinations
    rude = {"ugh", "seriously", "whatever", "stupid", "again", "boring", "away", "yourself", "bother", "waste", "stop"}
    for p in train + test:
        subject = next(s for s, _ in demo.DEMO_TOPICS if re.search(rf"\b{s}\b", first_question(p)))
        topic_words = {subject, *dict(demo.DEMO_TOPICS)[subject].split()}
        chosen = set(re.findall(r"\w+", p.chosen))
        rejected = set(re.findall(r"\w+", p.rejected))
        assert chosen & topic_words and not chosen & rude  # on topic and polite
        assert (rejected & rude) or not (rejected & topic_words)  # rude, or off topic
        assert p.source == "demo" and p.prompt.startswith(H) and p.prompt.endswith(A)


def test_demo_tokenizer_covers_demo_and_round_trips(tmp_path):
    tok = demo.demo_tokenizer()
    assert tok.vocab_size < 400
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    unk = tok.tok.token_to_id("<unk>")
    stats = DataStats()
    items = data.tokenize_pairs(data.load_pairs("demo", "train") + data.load_pairs("demo", "test"), tok, 256, stats)
    assert len(items) == 4500 and stats.truncated_prompt == 0
    assert all(unk not in it.chosen_ids and unk not in it.rejected_ids for it in items)
    assert 8 <= min(it.prompt_len for it in items) and max(it.prompt_len for it in items) <= 40
    lens = [n for it in items for n in (it.chosen_response_len, it.rejected_response_len)]
    assert 10 <= min(lens) and max(lens) <= 40
    assert tok.encode("zebra") == [unk]
    tok.save(str(tmp_path / "tok"))
    config = json.load(open(tmp_path / "tok" / "tokenizer_config.json"))
    assert (config["eos_token"], config["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    loaded = Tokenizer.from_dir(str(tmp_path / "tok"))
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    text = data.load_pairs("demo", "test", max_samples=1)[0].prompt + " sure! cats<|im_end|>"
    assert loaded.encode(text) == tok.encode(text) and loaded.encode(text)[-1] == tok.eos_id


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json; point at a model directory"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))
    demo.demo_tokenizer().save(str(tmp_path / "t"))
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(UserError, match=r"eos '</s>' or pad '<\|endoftext\|>' is not in the vocabulary"):
        Tokenizer.from_dir(str(tmp_path / "t"))
    (tmp_path / "t" / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="tokenizer_config.json is not valid JSON \\(nested too deeply\\)"):
        Tokenizer.from_dir(str(tmp_path / "t"))
    with open(tmp_path / "t" / "tokenizer_config.json", "wb") as f:
        f.truncate(1 << 30)  # sparse: a 1 GiB file was read whole
    with pytest.raises(UserError, match="tokenizer_config.json is over 16 MiB"):
        Tokenizer.from_dir(str(tmp_path / "t"))
    (tmp_path / "t" / "tokenizer_config.json").unlink()  # no config: Qwen3's defaults
    tok = Tokenizer.from_dir(str(tmp_path / "t"))
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


# -----------------------------------------------------------------------------
# Hostile inputs (#14): bounded reading, link loops, split words, BOM, deep nesting

def row(i, prompt=P1):
    return json.dumps({"prompt": prompt, "chosen": f" c{i}", "rejected": f" r{i}"}).encode()


def test_huge_jsonl_gz_line_is_skipped_with_bounded_memory(tmp_path):
    """A 256 MiB line in a 0.3 MiB .jsonl.gz: skipped and counted, reading goes on, memory stays small
    (reading it whole took twice its size: the bytes, then the parsed string)."""
    huge = 256 << 20
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(row(0) + b'\n{"prompt": "')
        for _ in range(huge >> 20):
            f.write(b"a" * (1 << 20))
        f.write(b'", "chosen": " x", "rejected": " y"}\n' + row(1) + b"\n" + row(2) + b"\n")
    out = subprocess.run([sys.executable, "-m", "tools.inspect_data", str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    report = json.loads(out[:out.index("peak RSS")])
    assert (report["read"], report["kept"], report["skipped"]) == (4, 3, {"row too large": 1})
    growth = float(re.search(r"peak RSS growth while reading: ([\d.]+) MiB", out).group(1))
    print(f"a {huge >> 20} MiB line in a {os.path.getsize(path) / 2**20:.1f} MiB .jsonl.gz: peak RSS growth {growth:.1f} MiB")
    assert growth < 2 * (readers.MAX_ROW_BYTES >> 20) + 16  # the cap (bytes read + parsed), not the line


def test_rows_over_the_byte_cap_are_skipped_in_every_format(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 1000)
    long = "w " * 1000
    lines = [row(0), row(1, long), b"x" * 5000, row(2)]  # a long row, a long unparsable line
    pairs, stats = read(write_lines(tmp_path / "a.jsonl", lines))
    assert [p.chosen for p in pairs] == [" c0", " c2"] and stats.skipped == {"row too large": 2}
    pq_path = write_parquet(tmp_path / "a.parquet", {"prompt": [P1, long, P1], "chosen": [" c0", " c1", " c2"],
                                                     "rejected": [" r0", " r1", None]})
    pairs, stats = read(pq_path)
    assert [p.chosen for p in pairs] == [" c0"] and stats.skipped == {"row too large": 1, "empty field": 1}
    monkeypatch.setattr(readers, "MAX_JSON_LIST_BYTES", 100)
    (tmp_path / "list.json").write_text(json.dumps([{"prompt": P1, "chosen": " a", "rejected": " b"}] * 5))
    with pytest.raises(UserError, match=r"list.json: a JSON list is parsed whole .* write one object per line "
                                        r"\(.jsonl\), which streams: jq -c '.\[\]' .*list.json > .*list.jsonl$"):
        list(data.iter_pairs(str(tmp_path / "list.json")))


def test_huge_row_is_dropped_before_tokenising_and_a_long_prompt_is_cut_exactly():
    tok = demo.demo_tokenizer()
    seen = []
    encode_batch = tok.encode_batch
    tok.encode_batch = lambda texts: seen.extend(map(len, texts)) or encode_batch(texts)
    huge = Pair(P1, " sure" * 2_000_000, " no", source="t")  # 10 MB: 4.6 GB and a minute to tokenise whole
    long_prompt = Pair(f"{H}" + " cats" * 50_000 + f"?{A}", " sure! cats", " ugh.", source="t")
    stats = DataStats()
    t = time.perf_counter()
    items = data.tokenize_pairs([huge, long_prompt], tok, 64, stats)
    # the tokenizer gets prompt + response, each at most the cap
    assert time.perf_counter() - t < 5 and max(seen) <= 2 * tok.char_cap(64) == 128 * tok.max_token_chars
    assert (stats.dropped_too_long, stats.tokenized, stats.truncated_prompt) == (1, 1, 1)
    # the same tokens as tokenising the whole prompt, then cutting it
    exact = data.truncate_pair(long_prompt, tok.encode(long_prompt.prompt), tok.encode(long_prompt.chosen),
                               tok.encode(long_prompt.rejected), tok, 64, DataStats())
    assert items == [exact] and data.tokenize_pair(tok, long_prompt, 64) == exact
    assert data.tokenize_pair(tok, huge, 64, stats) is None and stats.dropped_too_long == 2


def test_bom_and_deeply_nested_lines(tmp_path):
    rows = [{"prompt": P1, "chosen": " a", "rejected": " b"}, {"prompt": P2, "chosen": " c", "rejected": " d"}]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(r).encode() for r in rows))
    for name in ("bom.json", "bom.jsonl"):
        assert as_tuples(read(str(tmp_path / name))[0]) == [(P1, " a", " b"), (P2, " c", " d")]
    nested = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json.loads
    pairs, stats = read(write_lines(tmp_path / "deep.jsonl", [row(0), nested, row(1)]))
    assert [p.chosen for p in pairs] == [" c0", " c1"] and stats.skipped == {"unparsable line": 1}
    (tmp_path / "deep.json").write_bytes(nested)
    with pytest.raises(UserError, match="deep.json: invalid JSON"):
        list(data.iter_pairs(str(tmp_path / "deep.json")))


@pytest.mark.parametrize("links", [["self"], ["a", "b"]])
def test_link_loops_read_every_file_once_and_never_hang(tmp_path, links):
    """self -> . read a 40-row file 41 times; two such links hung the run (os.walk and glob's ** alike)."""
    root = tmp_path / "d"
    os.makedirs(root / "sub")
    write_lines(root / "sub" / "rows.jsonl", [row(i) for i in range(40)])
    os.symlink("rows.jsonl", root / "sub" / "same.jsonl")  # a link to a file: the same file
    for name in links:
        os.symlink(".", root / name)
    os.symlink("..", root / "sub" / "up")
    for source in (str(root), str(root / "**" / "*.jsonl")):
        code = f"import sys; sys.path.insert(0, {ROOT!r}); import data; print(len(data.load_pairs({source!r})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == "40", (source, out.stderr)


def test_split_words_in_file_names_as_the_hub_reads_them(tmp_path):
    cases = {"hh_train.parquet": "train", "hh-test-v2.jsonl": "test", "train_v2.jsonl": "train",
             "data/train-00000-of-00001.parquet": "train", "default/partial-train/0000.parquet": "train",
             "data/train_prefs-00000-of-00003.parquet": "train_prefs", "default/test_sft/0000.parquet": "test_sft",
             "train/part.jsonl": "train", "harmless-base/test.jsonl.gz": "test", "dev.jsonl": "validation",
             "my_eval.jsonl": "test", "2024_valid.json": "validation", "constraint.jsonl": None,
             "attest.jsonl": None, "testimony.jsonl": None, "retrain.jsonl": None, "data/0000.parquet": None}
    assert {p: hub.split_of(p) for p in cases} == cases
    root = tmp_path / "hh"
    os.makedirs(root)
    write_parquet(root / "hh_train.parquet", {"prompt": [P1], "chosen": [" t"], "rejected": [" x"]})
    write_parquet(root / "hh_test.parquet", {"prompt": [P1], "chosen": [" e"], "rejected": [" x"]})
    (root / "train_config.json").write_text("{}")  # a run's files are not data
    assert [p.chosen for p in read(str(root), "train")[0]] == [" t"]
    assert [p.chosen for p in read(str(root), "test")[0]] == [" e"]
    assert [p.chosen for p in read(str(root), "eval")[0]] == [" e"]  # eval names the test split
    plain = tmp_path / "plain"
    os.makedirs(plain)
    write_lines(plain / "constraint.jsonl", [row(0)])
    write_lines(plain / "attest.jsonl", [row(1)])
    assert [p.chosen for p in read(str(plain), "test")[0]] == [" c1", " c0"]  # no split: read whole


def test_a_comma_splits_a_string_only_when_it_is_not_a_path(tmp_path):
    comma = write_lines(tmp_path / "a,b.jsonl", [row(0)])
    other = write_lines(tmp_path / "c.jsonl", [row(1)])
    assert [p.chosen for p in data.load_pairs(comma)] == [" c0"]
    assert [p.source for p in data.load_pairs([comma, other])] == [comma, other]
    assert [p.chosen for p in data.load_pairs(f"{other},{other}")] == [" c1", " c1"]  # not a path: two sources


def test_imports_are_light_and_without_circles():
    """`from rm import RewardModel` loads neither pyarrow nor jinja2 (they load with a parquet file or a
    chat template), and support/demo.py does not need data.py (no data <-> demo knot)."""
    def loaded(statement):
        code = f"import sys; {statement}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=True).stdout
    assert "pyarrow" not in loaded("from rm import RewardModel") and "jinja2" not in loaded("from rm import RewardModel")
    assert "'data'" not in loaded("import support.demo")


def write_bomb_parquet(path, conversational: bool):
    """A few KB of zstd parquet: one row, a row group whose one cell decompresses to 256 MiB, one more row."""
    cell = "a" * (256 << 20)
    if conversational:
        def rows(text):
            return {"chosen": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]],
                    "rejected": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]]}
    else:
        def rows(text):
            return {"prompt": [P1], "chosen": [" " + text], "rejected": [" no"]}
    first = pa.table(rows("yes"))
    with pq.ParquetWriter(path, first.schema, compression="zstd") as writer:
        for text in ("yes", cell, "sure"):
            writer.write_table(pa.table(rows(text), schema=first.schema))
    del cell
    return str(path)


@pytest.mark.parametrize("conversational", [False, True], ids=["string", "conversation"])
def test_a_parquet_page_that_decompresses_to_256_mib_is_skipped_before_decoding(tmp_path, conversational):
    """A 256 MiB cell in a few KB of parquet (a string column, or a conversation's list<struct> column): its
    row group is measured from the page headers and skipped undecoded, counted; reading goes on and the
    reader's peak memory stays far below the cell (decoding it raised RSS by 0.8 GB, 1.5 GB as a conversation)."""
    path = write_bomb_parquet(tmp_path / "bomb.parquet", conversational)
    assert os.path.getsize(path) < 1 << 20
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    out = subprocess.run([sys.executable, "-m", "tools.inspect_data", path, "--chat_template", str(template)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out[:out.index("peak RSS")])
    assert (report["read"], report["kept"], report["skipped"]) == (3, 2, {"row group too large": 1})
    growth = float(re.search(r"peak RSS growth while reading: ([\d.]+) MiB", out).group(1))
    print(f"a 256 MiB cell in {os.path.getsize(path) / 2**10:.0f} KB of parquet: peak RSS growth {growth:.1f} MiB")
    assert growth < 128  # the cell is 256 MiB: any decoding of it shows; reading itself takes a few MiB


def test_parquet_rows_over_the_cap_are_measured_inside_conversations(tmp_path, monkeypatch):
    """row_bytes counts the text inside list<struct> columns, so an over-long conversation is a skipped row."""
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 1000)
    msgs = lambda text: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]  # noqa: E731
    table = pa.table({"chosen": [msgs("a" * 2000), msgs("yes")], "rejected": [msgs("no"), msgs("no")]})
    user, assistant = len("user") + len("hi"), len("assistant")  # role and content strings all count
    assert readers.row_bytes(table.to_batches()[0]).tolist() == [user + assistant + 2000 + user + assistant + 2,
                                                                 user + assistant + 3 + user + assistant + 2]
    rows = list(readers.read_file(write_parquet(tmp_path / "c.parquet", table.to_pydict())))
    assert rows[0] == readers.Skip("row too large") and rows[1]["chosen"] == msgs("yes")
    categorical = pa.record_batch([pa.array(["aa", None, "bbbb"]).dictionary_encode(), pa.array([["x", "yy"], None, []])],
                                  names=["prompt", "tags"])  # dictionary-encoded strings and list<string> count too
    assert readers.row_bytes(categorical).tolist() == [2 + 3, 0, 4]


def inspect(*args, timeout=300) -> tuple[dict, str]:
    """Run `python -m tools.inspect_data ARGS`: (its JSON report, its whole output)."""
    out = subprocess.run([sys.executable, "-m", "tools.inspect_data", *map(str, args)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, check=True).stdout
    start = out.index("\n{\n") + 1 if not out.startswith("{") else 0
    return json.loads(out[start:out.index("peak RSS")]), out


def test_inspect_data_counts_the_tokens_it_shows(tmp_path):
    """With --model every pair is tokenised as training does, so `tokenized` is what it says (it was 0
    right after the token counts were printed); without one the token counters are left out."""
    demo.demo_tokenizer().save(str(tmp_path / "tok"))
    report, out = inspect("demo", "--model", tmp_path / "tok", "--max-samples", 20, "--show", 1)
    assert re.search(r"prompt \(\d+ tokens\)", out)
    assert (report["read"], report["kept"], report["tokenized"], report["dropped_too_long"]) == (20, 20, 20, 0)
    report, _ = inspect("demo", "--model", tmp_path / "tok", "--max-samples", 20, "--max_length", 8)
    assert report["tokenized"] + report["dropped_too_long"] == 20 and report["dropped_too_long"] > 0
    report, _ = inspect("demo", "--max-samples", 20)
    assert "tokenized" not in report and report["kept"] == 20


def test_inspect_data_show_bounds_a_12_mb_row(tmp_path):
    """--show of a pair with a 12 MB response: the tokenizer gets at most what max_length tokens can cover
    (the pair is reported dropped), and the text is shown elided, not printed whole."""
    demo.demo_tokenizer().save(str(tmp_path / "tok"))
    huge = " cats" * ((12 << 20) // 5)
    path = write_lines(tmp_path / "big.jsonl", [row(0), json.dumps({"prompt": P1, "chosen": huge, "rejected": " dogs"}).encode()])
    report, out = inspect(path, "--model", tmp_path / "tok", "--show", 2)
    assert (report["kept"], report["tokenized"], report["dropped_too_long"]) == (2, 1, 1)
    assert "dropped: the longer response does not fit in --max_length 1024" in out and len(out) < 20_000
    assert f"({len(huge) - 2000:,} characters)" in out
    growth = float(re.search(r"peak RSS growth while reading: ([\d.]+) MiB", out).group(1))
    assert growth < 200  # the row itself is 12 MB (a str and its bytes); tokenising it whole took 1.6 GB


def run_inspect(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tools.inspect_data", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_a_fifo_or_a_device_given_as_the_dataset_is_refused_saying_what_it_is(tmp_path):
    """A FIFO (opening it would wait for a writer forever), /dev/zero (endless) or a link to either, as the
    source: one line naming what it is, not "no such file"; the timeout turns a hang into a failure."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    os.symlink("/dev/zero", tmp_path / "zero.jsonl")
    os.symlink(tmp_path / "pipe.jsonl", tmp_path / "link.parquet")
    for source, kind in ((tmp_path / "pipe.jsonl", "a named pipe (FIFO)"), ("/dev/zero", "a character device"),
                         (tmp_path / "zero.jsonl", "a character device"), (tmp_path / "link.parquet", "a named pipe")):
        proc = run_inspect(source)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and err.startswith("error: ") and "\n" not in err, err
        assert f"{source} is {kind}" in err and "not a regular file" in err and "no such file" not in err


def test_a_directory_walk_reads_regular_files_only_and_stays_inside_the_tree(tmp_path):
    """Inside a dataset directory: a FIFO, a link to /dev/zero and a link to a missing file are left out and
    counted (one line on stderr), a `root -> /` link is not followed out of the tree, a link loop ends; the
    regular files are read. Reading a FIFO or /dev/zero hung, and `root -> /` walked the whole filesystem."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    write_lines(d / "a.jsonl", [row(0), row(1)])
    write_lines(d / "sub" / "b.jsonl", [row(2)])
    os.mkfifo(d / "pipe.jsonl")
    os.symlink("/dev/zero", d / "zero.jsonl")
    os.symlink(d / "gone.jsonl", d / "dangling.jsonl")
    os.symlink("/", d / "root")
    os.symlink(".", d / "sub" / "loop")
    proc = run_inspect(d)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout[:proc.stdout.index("peak RSS")])
    assert (report["read"], report["kept"]) == (3, 3)
    notes = [line for line in proc.stderr.splitlines() if "left out" in line]
    assert len(notes) == 1 and "4 entries left out" in notes[0], proc.stderr
    for what in ("pipe.jsonl: a named pipe (FIFO)", "zero.jsonl: a character device", "dangling.jsonl: a dangling link",
                 "root: a link out of the directory"):
        assert what in notes[0]
    relpaths, outside = hub.walk_files(str(d))
    assert outside == ["root"] and os.path.join("sub", "b.jsonl") in relpaths
    assert not any(p.startswith("root") for p in relpaths)
    glob_proc = run_inspect(f"{d}/**/*.jsonl")  # a glob walks the same way
    assert glob_proc.returncode == 0 and '"kept": 3' in glob_proc.stdout and "left out" in glob_proc.stderr
    only_pipes = tmp_path / "pipes"
    only_pipes.mkdir()
    os.mkfifo(only_pipes / "train.jsonl")
    proc = run_inspect(only_pipes)
    assert proc.returncode == 2 and "no regular data file to read" in proc.stderr and "train.jsonl: a named pipe" in proc.stderr


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE unset", "HF_HUB_OFFLINE=1"])
def test_a_hub_dataset_without_network_fails_at_once_in_one_line(tmp_path, monkeypatch, capfd, offline):
    """No network (every name lookup fails, as on a machine without one) and nothing cached: one line, as
    fast and as quiet as a model (the listing retried for 25 s and printed 10 lines first)."""
    import socket

    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline != "HF_HUB_OFFLINE unset")
    if offline == "HF_HUB_OFFLINE unset":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capfd.readouterr()
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"Anthropic/hh-rlhf: .* nothing of it is in the HF cache") as e:
        data.load_pairs("Anthropic/hh-rlhf")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"{elapsed:.1f} s"  # ~0.1 s; the retries took 25 s
    assert "\n" not in str(e.value) and "Retry" not in "".join(capfd.readouterr())


def write_header_bomb_parquet(path) -> str:
    """A ~1 KB parquet of two row groups; the first one's page header declares a list of 2**62 booleans
    (an unknown field 8, compact protocol: 0x89 = delta 8 + list, 0xF1 = long size + bool elements)."""
    rows = {"prompt": [P1], "chosen": [" yes"], "rejected": [" no"]}
    with pq.ParquetWriter(path, pa.table(rows).schema, compression="none", use_dictionary=False) as writer:
        writer.write_table(pa.table(rows))
        writer.write_table(pa.table({**rows, "chosen": [" sure"]}))
    offset = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    size = 2**62
    bomb = bytes([0x89, 0xF1]) + bytes([(size >> s) & 0x7F | (0x80 if size >> s + 7 else 0) for s in range(0, 63, 7)])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bomb)
    return str(path)


def test_a_page_header_declaring_2_to_the_62_booleans_is_skipped_at_once(tmp_path):
    """A page header whose list declares 2**62 elements: the skipper visits at most MAX_HEADER_VALUES values
    of a header (it looped practically forever: eval.py, --benchmark, train.py, tools.inspect_data were
    killed after 45-120 s); the row group is skipped undecoded, counted, and the next one is read."""
    import signal
    path = write_header_bomb_parquet(tmp_path / "header.parquet")
    assert os.path.getsize(path) < 2048

    def too_slow(*_):
        raise TimeoutError("skipping one page header took over 20 s")
    before = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        t = time.perf_counter()
        rows = list(readers.read_file(path))
        took = time.perf_counter() - t
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert rows[0] == readers.Skip("page header too large") and rows[1]["chosen"] == " sure" and len(rows) == 2
    assert took < 2, took
    stats = DataStats()
    assert [p.chosen for p in data.iter_pairs(path, stats=stats)] == [" sure"]
    assert stats.skipped == {"page header too large": 1}


def test_inspect_data_counts_conversations_it_cannot_render_and_names_itself_in_hints(tmp_path):
    """A file mixing plain and conversational rows, no template: the plain pairs are reported and the
    conversations counted with what to pass (it printed two pairs, then stopped with an error). The flag is
    --max_samples as in train.py (the hyphen still works), and a bad flag's hint names the real command."""
    conv = json.dumps({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                       "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]})
    path = write_lines(tmp_path / "mixed.jsonl", [row(0), row(1), conv.encode(), row(2), conv.encode()])
    report, out = inspect(path, "--show", 5)
    assert (report["read"], report["kept"], report["skipped"]) == (5, 3, {"conversation without a chat template": 2})
    assert out.count("--- pair") == 3
    assert "2 conversational rows skipped: they need a chat template, but none was given; pass --model" in out
    for flag in ("--max_samples", "--max-samples"):
        assert inspect(path, flag, 1)[0]["read"] == 1
    proc = run_inspect(path, "--max_sample", "x")
    assert proc.returncode == 2 and "(see python -m tools.inspect_data --help)" in proc.stderr, proc.stderr


def test_the_held_out_share_does_not_depend_on_the_training_sample_limit():
    """--eval_fraction holds out pairs of ALL the training pairs by content hash, then --max_train_samples
    cuts the rest: the held-out pairs are the same with any limit (reading only max_train_samples pairs first
    made the held-out set shrink and move with it), and none of them is trained on."""
    from support import heldout
    plan = heldout.Plan(["demo"], "train", 0.1)
    whole = heldout.load(plan, ["demo"], None, None)
    assert 300 < len(whole.held_out) < 500  # ~10% of the demo's 4,000
    for limit in (50, 1000):
        cut = heldout.load(plan, ["demo"], limit, None)
        assert cut.held_out == whole.held_out and len(cut.train) == limit
        assert not {data.pair_key(p) for p in cut.train} & {data.pair_key(p) for p in cut.held_out}


def test_texts_cut_as_they_are_read_give_the_same_ids_rewards_and_held_out_share(tmp_path):
    """load_pairs(..., char_cap=Tokenizer.char_cap(max_length)) cuts each text as it is read (data.cut_texts);
    the token ids, the counts, the held-out share and the rewards are those of reading the texts whole. A
    byte-level BPE whose merges cross word parts, long prompts (plain, hh-rlhf transcripts, conversations
    rendered with Qwen3's template) and responses too long to fit."""
    import eval as eval_cli
    from conftest import tiny_rm
    from test_chat import make_model_dir
    tok = Tokenizer.from_dir(str(make_model_dir(tmp_path / "bpe")))
    max_length = 24
    cap = tok.char_cap(max_length)
    words = "The capital of France is Paris. What is the capital of France? Let me think about it step by step. "
    long = words * (cap // len(words) + 2)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = [{"prompt": f"{H} {long}{A}", "chosen": " Paris.", "rejected": " Lyon."},
            {"prompt": P1, "chosen": " " + long, "rejected": " no."},
            {"chosen": f"{H} {long}{A} Paris.", "rejected": f"{H} {long}{A} Rome, surely."},
            {"prompt": P2, "chosen": " sure", "rejected": " nope"},
            {"prompt": user(long), "chosen": reply("Paris."), "rejected": reply("It is Lyon.")}]
    path = str(write_lines(tmp_path / "long.jsonl", [json.dumps(r).encode() for r in rows]))
    chat_format = tok.chat_format()
    whole_stats = DataStats()
    cut_stats = DataStats()
    whole = data.load_pairs(path, stats=whole_stats, chat_format=chat_format)
    cut = data.load_pairs(path, stats=cut_stats, chat_format=chat_format, char_cap=cap)
    assert len(cut) == 5 and sum(p.cut_to == cap for p in cut) == 4  # the test can fail: texts were cut
    assert max(len(t) for p in cut for t in (p.prompt, p.chosen, p.rejected)) <= cap + 1 < len(long)
    tokenized = [data.tokenize_pairs(pairs, tok, max_length, stats) for pairs, stats in ((whole, whole_stats),
                                                                                        (cut, cut_stats))]
    assert tokenized[0] == tokenized[1] and whole_stats == cut_stats and len(tokenized[0]) == 4
    assert whole_stats.truncated_prompt == 4 and whole_stats.dropped_too_long == 1
    for fraction in (0.2, 0.5, 0.8):
        assert [data.is_held_out(p, fraction) for p in whole] == [data.is_held_out(p, fraction) for p in cut]
    model = tiny_rm(tok, min_vocab=512)
    reports = [eval_cli.evaluate(model, pairs, max_length=max_length, progress=False) for pairs in (whole, cut)]
    assert reports[0] == reports[1]
    with pytest.raises(ValueError, match="cut to"):  # read for one max_length, tokenised at a longer one
        data.tokenize_pairs(cut, tok, 4 * max_length)


@pytest.mark.parametrize("kind", ["parquet", "jsonl.gz"])
def test_what_a_file_can_make_readers_keep_is_bounded_by_what_max_length_can_use(tmp_path, kind, monkeypatch):
    """32 rows whose prompt is the same 1 MiB text, in a 1 KB dictionary-encoded parquet or a 100 KB
    jsonl.gz (200 such rows of 15 MiB took --benchmark to 3.6 GB, eval.py to 1.09 GB, a 614 KB .jsonl.gz to
    990 MB). Each text is cut as it is read, so what stays is rows x char_cap, not rows x 1 MiB, and a decoded
    batch becomes Python objects MAX_PYTHON_BYTES at a time (Python allocations, tracemalloc)."""
    import tracemalloc
    n, big, cap = 32, "a" * (1 << 20), 1000
    path = tmp_path / f"rows.{kind}"
    if kind == "parquet":
        prompt = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array([big]))
        pq.write_table(pa.table({"prompt": prompt, "chosen": [" yes"] * n, "rejected": [" no"] * n}), path,
                       compression="zstd")
    else:
        line = gzip.compress((json.dumps({"prompt": big, "chosen": " yes", "rejected": " no"}) + "\n").encode())
        path.write_bytes(line * n)  # gzip members one after another: one stream of n lines
    assert os.path.getsize(path) < 200 << 10
    monkeypatch.setattr(readers, "MAX_PYTHON_BYTES", 4 << 20)  # 4 rows of 1 MiB made str at a time (of 32 decoded)
    tracemalloc.start()
    try:
        pairs = data.load_pairs(str(path), char_cap=cap)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"{kind}: {n} rows of 1 MiB in {os.path.getsize(path):,} bytes: {kept >> 10} KiB kept, peak {peak >> 20} MiB")
    assert len(pairs) == n and {p.prompt for p in pairs} == {big[-cap:]}
    assert kept < 4 << 20 and peak < 16 << 20  # whole: over n MiB kept (and pyarrow imported meanwhile)


def test_the_data_fingerprint_does_not_depend_on_the_cut():
    """pairs_digest (a resume's "same training data" check) and is_held_out read the whole texts' hash, so a
    resume at another --max_length (another cut) finds the same data and the same held-out share."""
    pairs = [Pair(P1 + "x" * 5000, " yes", " no"), Pair(P2, " a" * 3000, " b"), Pair(P1, " c", " d")]
    for cap in (100, 4000):
        cut = [data.cut_texts(p, cap) for p in pairs]
        assert any(c != p for c, p in zip(cut, pairs)) and data.pairs_digest(cut) == data.pairs_digest(pairs)
    assert data.pairs_digest(pairs[:2]) != data.pairs_digest(pairs[1:]) != data.pairs_digest(pairs[::-1][:2])
