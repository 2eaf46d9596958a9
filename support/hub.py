"""Where files come from: model directories and dataset files, local or on the Hugging Face Hub.

- A model is a local directory, or a Hub repo id fetched with huggingface_hub into its usual cache
  (only config, tokenizer and safetensors files); with HF_HUB_OFFLINE=1 only the cache is read.
  A local directory may also be a train.py checkpoint or output directory (local_model_dir): eval.py's
  CHECKPOINT and train.py's --model alike. An org/name that is no local directory is looked up on the Hub,
  and a failure says first that there is no such local directory.
- A dataset (dataset_files) is a local file, glob (taken as given) or directory, or a Hub dataset id.
  A directory or repo is split-aware when its file names carry split words as the Hub's patterns do
  (train.jsonl, hh_train.parquet, train_v2.jsonl, test-00000-of-00001.parquet, train/0000.parquet,
  partial-train/...; dev/valid/val mean validation, eval/testing mean test); a directory without them is
  read whole, a repo without them is one "train" split (the HF convention). A directory is walked
  following links, each real directory and file once (a link loop neither repeats nor hangs).
- On the Hub, a repo is listed on main; without parquet files for the split, its parquet conversion
  (refs/convert/parquet) is used, else main's json/jsonl(.gz) files. Shards download one at a time.
- Offline (HF_HUB_OFFLINE=1, read at call time) or when listing fails, dataset files come from the HF
  cache: the snapshot a ref points at, else the newest one (only what was downloaded before).
"""
import fnmatch
import glob
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from support.errors import UserError
from support import fileio
from support.fileio import read_bounded

WEIGHT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json"]
DATA_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json")
PARQUET_REVISION = "refs/convert/parquet"  # where the Hub keeps its parquet conversion of a dataset


# -----------------------------------------------------------------------------
# Models


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not os.path.isabs(name)


def local_model_dir(path: Path) -> Path | None:
    """Where a model's config.json is in a local directory: the directory itself, a train.py checkpoint's
    model/, or a train.py output directory's final_model/ (eval.py's CHECKPOINT and train.py --model alike).
    None when none of them holds one."""
    for candidate in (path, path / "model", path / "final_model"):
        if (candidate / "config.json").is_file():
            return candidate
    if (path / "adapters").is_dir():  # train.py --lora_rank: a checkpoint holds adapters, not a model
        raise UserError(f"{path} is a LoRA checkpoint: it holds the adapters only, not a model; use the "
                        "run's final_model/ or best_model_step_N/ (saved merged)")
    return None


def resolve_model_dir(name_or_path: str) -> Path:
    """A local directory (local_model_dir); else a Hub repo id through huggingface_hub (the local cache
    first, and only the config, tokenizer and safetensors files; HF_HUB_OFFLINE=1 never touches the network)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return local_model_dir(path) or path  # without config.json: reading it says what is missing
    if path.exists():
        raise UserError(f"{name_or_path} is a file; pass the checkpoint DIRECTORY that holds config.json")
    if not looks_like_repo_id(name_or_path):
        raise UserError(f"model directory {name_or_path} does not exist; pass an existing directory "
                        "or a Hub repo id such as Qwen/Qwen3-0.6B")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    # org/name is a local path or a Hub id: say first that no such directory is here, then why the Hub failed
    no_dir = f"there is no local directory {name_or_path}"
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=WEIGHT_FILES))
    except RepositoryNotFoundError:
        raise UserError(f"{no_dir}, nor a model {name_or_path} on the Hugging Face Hub; check the path or the "
                        "spelling (and HF_TOKEN for private repos)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{no_dir}; as a Hub model id, it is not in the local Hugging Face cache and the Hub cannot "
                        "be reached (HF_HUB_OFFLINE=1 or no network): check the path, or download it once with "
                        "network access") from None
    except Exception as e:  # network errors and the like: still one line
        raise UserError(f"{no_dir}; as a Hub model id, fetching it failed ({type(e).__name__}: {e}): check the "
                        "path, or the network") from None


MAX_JSON_BYTES = 16 << 20  # config.json, an index of shards: kilobytes in every real checkpoint


def read_json(path: Path, what: str) -> dict:
    """A small JSON object file (a config, an index of shards): at most MAX_JSON_BYTES are read, and only
    from a regular file (a FIFO or a device is refused in one line, never opened)."""
    if not path.exists():
        raise UserError(f"{path} is missing: {what}")
    try:
        raw = read_bounded(path, MAX_JSON_BYTES)
    except OSError as e:
        raise UserError(f"{path} can't be read ({e.strerror or e}); check its permissions") from None
    except ValueError:
        raise UserError(f"{path} is over {MAX_JSON_BYTES >> 20} MiB, far more than a config ever holds; "
                        "re-download or re-save the checkpoint") from None
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise UserError(f"{path} is not valid JSON ({reason}); re-download or re-save the checkpoint") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; "
                        "re-download or re-save the checkpoint")
    return value


def find_model_dir(ckpt: str) -> tuple[Path, Path]:
    """(the directory holding the model's config.json, the directory the report goes to by default).

    A local path may be a model directory itself, a train.py checkpoint (its model in model/), or a
    train.py output directory (final_model/ inside). Anything else that looks like org/name is a Hub id:
    the model comes from the Hub (or its local cache) and the report goes to the current directory, not
    into the cache.
    """
    path = Path(ckpt).expanduser()
    if path.is_dir():
        found = local_model_dir(path)
        if found is None:
            raise UserError(f"{ckpt} holds no model: expected config.json in it, in {ckpt}/model/ (a train.py "
                            f"checkpoint) or in {ckpt}/final_model/ (a train.py output directory)")
        return found, path
    if path.exists():
        raise UserError(f"{ckpt} is a file; pass the checkpoint DIRECTORY (the one holding config.json)")
    if not looks_like_repo_id(ckpt):
        raise UserError(f"checkpoint {ckpt} does not exist; pass a directory written by train.py "
                        f"(e.g. out/final_model) or a Hub model id")
    return resolve_model_dir(ckpt), Path.cwd()


# -----------------------------------------------------------------------------
# Dataset files

def dataset_files(source: str, split: str) -> tuple[list[str], Callable[[str], str]]:
    """(the files of `split` in reading order, fetch): fetch(name) returns a local path, downloading a
    Hub shard when it is reached. What is missing (path, split, repo) is a UserError now, not later."""
    if is_local_source(source):
        return local_files(source, split), lambda path: path
    return hub_files(source, split)


def is_local_source(source: str) -> bool:
    return (os.path.exists(os.path.expanduser(source)) or source.endswith(DATA_SUFFIXES)
            or source.startswith((".", "/", "~")) or any(c in source for c in "*?[")
            or not re.fullmatch(r"[\w.-]+/[\w.-]+", source))


# The Hub's split keywords (datasets' data_files.py): a word of a file or directory name, between
# separators (-._ space, digits, /), names the split; so hh_train.parquet and train_v2.jsonl are "train"
# while constraint.jsonl and attest.jsonl name none.
SPLIT_WORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}
SHARD = re.compile(r"(.+?)-\d{5}-of-\d{5}")  # the Hub's shard names: {split}-00000-of-00003
# files train.py and eval.py write (and a model's): never data, even in a directory next to data
RUN_FILES = {"train_config.json", "trainer_state.json", "evaluation_report.json", "log.jsonl", "config.json",
             "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"}


def split_name(name: str) -> str:
    """A split's canonical name: dev -> validation, eval -> test, train -> train, train_prefs as is."""
    return SPLIT_WORDS.get(name.lower(), name)


def split_word(name: str) -> str | None:
    """The split a name carries as a separate word, canonical; None if it carries none."""
    words = [w for w in re.split(r"[-._ 0-9]+", name.lower()) if w in SPLIT_WORDS]
    return SPLIT_WORDS[words[0]] if words else None


def split_of(relpath: str) -> str | None:
    """The split a file belongs to by its name: hh_train.parquet, train_v2.jsonl, data/test-00000-of-00001.parquet,
    train/0000.parquet, partial-train/0000.parquet, harmless-base/test.jsonl.gz; else None. The Hub's own
    shard names keep the split's exact name when it starts with a split word (train_prefs-00000-of-00001)."""
    parts = relpath.replace("\\", "/").split("/")
    stem = parts[-1]
    for suffix in DATA_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    shard = SHARD.fullmatch(stem)
    exact = shard.group(1) if shard else None
    if stem.isdigit() and len(parts) > 1:  # the parquet conversion: {config}/{split}/0000.parquet
        exact = parts[-2].removeprefix("partial-")
    if exact and split_word(re.split(r"[-._ 0-9]", exact)[0]):
        return split_name(exact)
    for name in [stem] + list(reversed(parts[:-1])):
        if (split := split_word(name)) is not None:
            return split
    return None


def data_files(relpaths: list[str]) -> list[str]:
    """The supported files, sorted, leaving out hidden ones (.cache/, .git/ ...) and RUN_FILES."""
    return sorted(p for p in relpaths if p.endswith(DATA_SUFFIXES) and os.path.basename(p) not in RUN_FILES
                  and not any(part.startswith(".") for part in p.replace("\\", "/").split("/")))


def split_files(relpaths: list[str], split: str) -> tuple[list[str] | None, list[str]]:
    """(the data files of `split`, the splits there). None when no file carries a split name."""
    files = data_files(relpaths)
    splits = {p: split_of(p) for p in files}
    available = sorted({s for s in splits.values() if s})
    if not available:
        return None, []
    return [p for p in files if splits[p] == split_name(split)], available


def walk_files(root: str) -> tuple[list[str], list[str]]:
    """(the files under `root`, the directory links left out), as relative paths. Links to directories are
    followed while they stay inside the tree (`root -> /` is left out), each real directory entered once: a
    link loop (self -> .) ends, and a directory linked twice is listed once. Files are every entry that is
    not a directory: local_files tells the regular ones from the rest."""
    top = os.path.realpath(root)
    seen, found, outside = set(), [], []
    for d, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()  # the first path to a directory linked twice is the same on every run
        for name in list(dirs):
            real = os.path.realpath(os.path.join(d, name))
            if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
                dirs.remove(name)
                outside.append(os.path.relpath(os.path.join(d, name), root))
        found += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return found, outside


def unique_files(paths: list[str]) -> list[str]:
    """paths without the later ones that are the same file (a link, a directory reached twice)."""
    seen, out = set(), []
    for p in paths:
        try:
            st = os.stat(p)
            key = (st.st_dev, st.st_ino)
        except OSError:  # a dangling link: the reader says what is wrong with it
            key = p
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def glob_files(pattern: str) -> list[str]:
    """glob.glob (directories left out), but "**" walks with walk_files: glob's own "**" follows link
    loops forever, and out of the tree."""
    parts = pattern.replace("\\", "/").split("/")
    if "**" not in parts:
        return sorted(p for p in glob.glob(pattern) if not os.path.isdir(p))
    static = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = "/".join(parts[:static]) or ("/" if pattern.startswith("/") else ".")
    found = [os.path.join(root, rel) if static else rel
             for rel in walk_files(root)[0] if glob_match(parts[static:], rel.split(os.sep))]
    return sorted(p for p in found if not os.path.isdir(p))


def glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Whether path components match pattern components ("**": any number of components)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and glob_match(pattern[1:], parts[1:])


def local_files(source: str, split: str) -> list[str]:
    """A file as given; a glob's matches (whatever the split); a directory's files of `split`. Each real
    file once, however many links lead to it. Only regular files: a FIFO or a device given as the source is
    a UserError saying what it is; one found by a glob or inside a directory is left out and counted."""
    path = os.path.expanduser(source)
    if any(c in path for c in "*?["):
        matches = glob_files(path)
        if not matches:
            raise UserError(f"{source}: the pattern matches no files; check the path (and quote the pattern)")
        files = regular_files(source, [p for p in matches if p.endswith(DATA_SUFFIXES)], [])
        if not files:
            raise UserError(f"{source}: the pattern matches no .parquet/.jsonl/.jsonl.gz/.json files")
        return unique_files(files)
    if os.path.isdir(path):
        relpaths, outside = walk_files(path)
        files, available = split_files(relpaths, split)
        if files is None:  # no split names: the whole directory, whatever the split
            files = data_files(relpaths)
            if not files:
                raise UserError(f"{source}: the directory holds no .parquet/.jsonl/.jsonl.gz/.json files")
        elif not files:
            raise UserError(f"{source}: no '{split}' split in the directory; available splits: "
                            f"{', '.join(available)}")
        return unique_files(regular_files(source, [os.path.join(path, p) for p in files], outside))
    if os.path.exists(path) and not fileio.is_regular(path):  # a FIFO, /dev/zero, or a link to one
        raise fileio.not_regular(source, os.stat(path).st_mode)
    if os.path.isfile(path):
        if not path.endswith(DATA_SUFFIXES):
            raise UserError(f"{source}: unsupported file type; use .parquet, .jsonl, .jsonl.gz or .json")
        return [path]
    raise UserError(f"{source}: no such file or directory (nor a Hub dataset id like Anthropic/hh-rlhf)")


_REPORTED = set()  # (source, what was left out) already counted on stderr by this process


def regular_files(source: str, paths: list[str], outside: list[str]) -> list[str]:
    """The regular files among `paths`. What is left out (a FIFO, a device, a dangling link, a link to a
    directory outside the tree) is counted in one line on stderr, never skipped silently; a UserError when
    nothing is left."""
    files = [p for p in paths if fileio.is_regular(p)]
    left_out = [f"{p}: {fileio.file_kind(os.stat(p).st_mode) if os.path.exists(p) else 'a dangling link'}"
                for p in paths if p not in files] + [f"{p}: a link out of the directory" for p in outside]
    listed = "; ".join(left_out[:5]) + ("; ..." if len(left_out) > 5 else "")
    if paths and not files:
        raise UserError(f"{source}: no regular data file to read, only regular files are read ({listed})")
    if left_out and (source, listed) not in _REPORTED:  # local_files runs more than once per source
        _REPORTED.add((source, listed))
        print(f"data: {source}: {len(left_out)} entr{'y' if len(left_out) == 1 else 'ies'} left out, only regular "
              f"files inside the tree are read ({listed})", file=sys.stderr)
    return files


def hf_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; look at the environment now too
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> str:
    """The HF hub cache, from the environment as it is now."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expanduser(os.path.expandvars(cache))


def hub_files(repo: str, split: str) -> tuple[list[str], Callable[[str], str]]:
    """A Hub dataset's files of `split` and their fetch: listed on the Hub, or from the cache offline."""
    from huggingface_hub.errors import RepositoryNotFoundError
    cache = hf_cache_dir()
    if hf_offline():
        return cached_files(repo, split, cache, "HF_HUB_OFFLINE is set")
    try:
        listings = _hub_listings(repo, split)
    except RepositoryNotFoundError:  # also gated/private repos without a token
        raise UserError(f"{repo}: no such dataset on the Hub (or it is private/gated: run "
                        f"`hf auth login`); check the name") from None
    except Exception as e:  # no network, Hub down, ...: the cache may have it
        return cached_files(repo, split, cache, f"listing it on the Hub failed ({type(e).__name__}: {e})")
    revision, files = _pick_revision(repo, listings, split, "on the Hub")
    return files, _downloader(repo, revision, cache)


def _hub_listings(repo: str, split: str) -> list[tuple[str, list[str]]]:
    """(revision, files) of main, and of the parquet conversion when main has no parquet for `split`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError
    api = HfApi()
    # one request first that is not retried: without a network the listing below retries for 25 s, with a
    # line of output each time, where a model (snapshot_download asks the same way) fails in under 2 s
    api.repo_info(repo, repo_type="dataset")
    listings = [("main", api.list_repo_files(repo, repo_type="dataset"))]
    files, _ = split_files(listings[0][1], split)
    if not any(f.endswith(".parquet") for f in files or []):
        try:
            listings.append((PARQUET_REVISION, api.list_repo_files(repo, repo_type="dataset",
                                                                   revision=PARQUET_REVISION)))
        except RevisionNotFoundError:
            pass  # no parquet conversion: use main's files
    return listings


def _downloader(repo: str, revision: str, cache: str) -> Callable[[str], str]:
    from huggingface_hub import hf_hub_download

    def fetch(file: str) -> str:
        try:
            return hf_hub_download(repo, file, repo_type="dataset", revision=revision, cache_dir=cache)
        except Exception as e:  # network gone, disk full, ...
            raise UserError(f"{repo}: downloading {file} failed ({type(e).__name__}: {e}); check the "
                            f"network and disk, or set HF_HUB_OFFLINE=1 to use what is cached") from None
    return fetch


def _pick_revision(repo: str, listings: list[tuple[str, list[str]]], split: str,
                   where: str) -> tuple[str, list[str]]:
    """(revision or snapshot dir, files of `split`): parquet files first, on whichever
    revision has them, then json/jsonl(.gz) files. A UserError listing the splits if none."""
    found, all_splits = [], set()
    for revision, relpaths in listings:
        files, available = split_files(relpaths, split)
        if files is None:  # the HF convention: a repo without split names is one train split
            files = data_files(relpaths) if split == "train" else []
            available = ["train"] if data_files(relpaths) else []
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


def cached_files(repo: str, split: str, cache: str, why_offline: str) -> tuple[list[str], Callable[[str], str]]:
    """The files of `split` in the HF cache's snapshots of a dataset (local paths, fetch does nothing)."""
    listings = []
    for snap in _cached_snapshots(repo, cache):
        relpaths = [os.path.relpath(os.path.join(d, f), snap) for d, _, fs in os.walk(snap) for f in fs
                    if fileio.is_regular(os.path.join(d, f))]  # skip links to missing blobs
        listings.append((snap, relpaths))
    if not any(relpaths for _, relpaths in listings):
        raise UserError(f"{repo}: {why_offline} and nothing of it is in the HF cache {cache}; run once "
                        f"online to download it, or point HF_HUB_CACHE at a cache that has it")
    snap, files = _pick_revision(repo, listings, split, f"in the HF cache {cache}")
    print(f"data: {repo} ({split}) offline: reading {len(files)} cached file(s) from {snap}", file=sys.stderr)
    return [os.path.join(snap, f) for f in files], lambda path: path


def _cached_snapshots(repo: str, cache: str) -> list[str]:
    """The snapshot dirs of a dataset in the HF cache: those refs point at first, then newest first."""
    repo_dir = os.path.join(cache, "datasets--" + repo.replace("/", "--"))
    snapshots = os.path.join(repo_dir, "snapshots")
    found = []
    # the library writes refs/<revision>, so refs/convert/parquet lands in refs/refs/convert/parquet
    for revision in ("main", PARQUET_REVISION, "convert/parquet"):
        ref = os.path.join(repo_dir, "refs", revision)
        if fileio.is_regular(ref):
            snap = os.path.join(snapshots, read_bounded(ref, 4096).decode("utf-8", "replace").strip())
            if os.path.isdir(snap) and snap not in found:
                found.append(snap)
    if os.path.isdir(snapshots):
        others = [os.path.join(snapshots, d) for d in os.listdir(snapshots)]
        found += [s for s in sorted(others, key=os.path.getmtime, reverse=True) if os.path.isdir(s) and s not in found]
    return found


def import_bitsandbytes():
    """bitsandbytes, imported without reaching the Hub. On a CPU with AVX512-BF16 its import fetches an
    optional 4-bit kernel with the `kernels` package: a network call, then notices that depend on the
    network and the cache (offline: "Skipping publisher trust check for 'kernels-community/...'"). We use
    no 4-bit kernel, so the import sees no `kernels` package, and its warning about that is silenced."""
    import logging
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, hide = log.level, "kernels" not in sys.modules
    log.setLevel(logging.ERROR)
    if hide:
        sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("--8bit_optim/--8bit_model need bitsandbytes: pip install bitsandbytes") from None
    finally:
        log.setLevel(level)
        if hide:
            del sys.modules["kernels"]
    return bitsandbytes
