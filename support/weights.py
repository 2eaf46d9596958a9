"""Qwen3 checkpoints on disk: config.json's fields checked, and safetensors weights read with every tensor
checked against the model before any data is read.

- `check_config` / `config_fields`: a config.json's values of the right type and size, before any module
  is built from them (a hand-edited or hostile config must not make us allocate for minutes first).
- `read_header`: {checkpoint key: Entry} from the safetensors headers alone. Only floating-point tensors
  (F32, F16, BF16) are weights; the layer count and embeddings must agree with config.json. Checkpoints
  saved by transformers' bare `Qwen3Model` (as embedding models are published) name their tensors without
  the `model.` prefix: their keys are read under the usual `model.*` names.
- `load_weights`: fills a model built on the meta device, one tensor at a time, after `check_fits` has
  compared every name and shape with the model.
support/hub.py finds the directories; qwen3.py and support/export.py (the reward model) call these.
"""
import os
import re
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import torch.nn as nn

from support import fileio
from support.errors import UserError
from support.hub import read_json

# Upper bounds far above any released Qwen3 (the 32B model: 64 layers, hidden 5120, intermediate 25600):
# enough to refuse a config that would build modules for minutes before the weights could disagree.
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
          "max_position_embeddings": 1 << 24}
# The dtypes a weight can have on disk (safetensors' names). An integer or bool tensor of the right shape
# would load, then fail (or compute nonsense) at the first matmul.
WEIGHT_DTYPES = ("F32", "F16", "BF16")
# The top-level modules of a bare transformers Qwen3Model, saved without the `model.` prefix.
BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.")


# ----------------------------------------------------------------------------------------------
# config.json

def check_config(config) -> None:
    """Every field of a Qwen3Config of the right type and size (its __post_init__)."""
    for name, top in LIMITS.items():
        value = getattr(config, name)
        if type(value) is not int or not 0 < value <= top:  # type(), not isinstance: True is not a size
            raise UserError(f"{name} must be a whole number from 1 to {top:,} (got {value!r})")
    for name in ("rope_theta", "rms_norm_eps"):
        value = getattr(config, name)
        if type(value) not in (int, float) or not 0 < value < float("inf"):
            raise UserError(f"{name} must be a positive number (got {value!r})")
    if type(config.tie_word_embeddings) is not bool:
        raise UserError(f"tie_word_embeddings must be true or false (got {config.tie_word_embeddings!r})")
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise UserError(
            f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_key_value_heads}) for grouped-query attention")
    if config.head_dim % 2:
        raise UserError(f"head_dim must be even (got {config.head_dim}): rotary embeddings turn pairs of features")


def config_fields(config_class, d: dict, where: str) -> dict:
    """The keyword arguments of `config_class` (qwen3.Qwen3Config) that a Hugging Face Qwen3 config.json
    dict gives, after refusing what this implementation does not do (another model type, biases, scaled RoPE)."""
    model_type = d.get("model_type")
    if model_type != "qwen3":
        raise UserError(f"{where} is not a Qwen3 config (model_type={model_type!r}); "
                        f"point --model at a Qwen3 checkpoint such as Qwen/Qwen3-0.6B")
    if d.get("attention_bias"):
        raise UserError(f"{where} sets attention_bias=true, which Qwen3 checkpoints never do; "
                        "this implementation has no attention biases")
    # transformers < 5 and the released configs say rope_theta / rope_scaling; transformers 5 writes
    # rope_parameters = {"rope_type", "rope_theta"}. Accept both, and only plain (unscaled) RoPE.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{where} uses rope scaling {rope}, which is not supported; "
                        "use a checkpoint without rope scaling")
    d = {**d, "rope_theta": d.get("rope_theta") or rope.get("rope_theta")}
    known = {f.name for f in fields(config_class)}
    kwargs = {k: v for k, v in d.items() if k in known and v is not None}
    hidden, heads = (kwargs.get(k, getattr(config_class, k)) for k in ("hidden_size", "num_attention_heads"))
    if "head_dim" not in kwargs and type(hidden) is int and type(heads) is int and heads > 0:
        kwargs["head_dim"] = hidden // heads  # older configs leave it out: then it is hidden / heads
    return kwargs


def read_config(model_dir: Path) -> dict:
    """config.json of a model directory, as a dict (bounded in size, an object)."""
    return read_json(model_dir / "config.json", "a checkpoint directory must hold the model's config.json")


# ----------------------------------------------------------------------------------------------
# safetensors files

class Entry(NamedTuple):
    """Where a tensor is and what it is, from a safetensors header: no data read."""
    file: Path
    key: str           # its name in the file (a bare Qwen3Model's have no `model.` prefix)
    shape: tuple
    dtype: str         # safetensors' name: F32, BF16, I64, ...


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if fileio.is_regular_file(index):  # sharded: the index maps every tensor to its shard, a file in this directory
        weight_map = read_json(index, "").get("weight_map")
        names = set(weight_map.values()) if isinstance(weight_map, dict) and weight_map else {None}
        if not all(isinstance(n, str) and n == Path(n).name and n.endswith(".safetensors") for n in names):
            raise UserError(f"{index} has no valid weight_map (tensor name -> shard file in this directory); "
                            "re-download the checkpoint")
        files = [model_dir / f for f in sorted(names)]
        missing = [str(f.name) for f in files if not fileio.is_regular_file(f)]
        if missing:
            raise UserError(f"{model_dir}: shard(s) {missing} listed in model.safetensors.index.json are missing; "
                            "re-download the checkpoint")
        return files
    single = model_dir / "model.safetensors"
    if fileio.is_regular_file(single):
        return [single]
    raise UserError(f"{model_dir} holds no model.safetensors (nor an index of shards); "
                    "point at a directory with safetensors weights")


@contextmanager
def opened(file: Path):
    """safe_open, with a header or data that cannot be read (a truncated download, usually) as one line."""
    from safetensors import safe_open
    if os.fsencode(file).decode("utf-8", "replace").encode() != os.fsencode(file):  # not corrupt: unopenable
        raise UserError(f"{str(file)!r}: its path is not valid UTF-8 (a byte of another encoding in a name), which "
                        "the safetensors library cannot open; rename the directory to a UTF-8 name")
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{file} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "delete it and download the checkpoint again") from None


def read_header(model_dir: Path, config) -> dict[str, Entry]:
    """{checkpoint key: Entry} from the safetensors headers alone: no tensor data is read. A bare Qwen3Model's
    keys (no `model.` prefix) come back under their `model.*` names. Tensors that are not floating point, or
    whose layer count or embeddings disagree with config.json, are refused here, before a model is built."""
    header = {}
    for file in safetensors_files(model_dir):
        with opened(file) as f:
            for key in f.keys():
                if key in header:
                    raise UserError(f"{model_dir}: tensor {key} is in two shards ({header[key].file.name}, "
                                    f"{file.name}); re-download the checkpoint")
                tensor = f.get_slice(key)
                header[key] = Entry(file, key, tuple(tensor.get_shape()), tensor.get_dtype())
    if not any(key.startswith("model.") for key in header):  # transformers' bare Qwen3Model
        header = {("model." + key if key.startswith(BARE_PREFIXES) else key): e for key, e in header.items()}
    not_weights = [e for e in header.values() if e.dtype not in WEIGHT_DTYPES]
    if not_weights:
        first, more = not_weights[0], f" and {len(not_weights) - 1} more" if len(not_weights) > 1 else ""
        raise UserError(f"{first.file}: tensor {first.key}{more} holds {first.dtype} values, not weights (F32, F16 "
                        "or BF16); the checkpoint is corrupt or hand-edited: re-download or re-save it")
    layers = 1 + max((int(m[1]) for key in header if (m := re.match(r"model\.layers\.(\d+)\.", key))), default=-1)
    embed = header["model.embed_tokens.weight"].shape if "model.embed_tokens.weight" in header else None
    if layers != config.num_hidden_layers or embed not in (None, (config.vocab_size, config.hidden_size)):
        raise UserError(f"{model_dir} does not match its config.json: the weights hold {layers} layers and embeddings "
                        f"of shape {embed}, config.json says {config.num_hidden_layers} layers and "
                        f"({config.vocab_size}, {config.hidden_size}); restore its config.json or re-download it")
    return header


def load_weights(model: nn.Module, model_dir: Path, dtype, our_name=lambda key: key, keep=frozenset(),
                 header: dict | None = None):
    """Fill `model` (built on the meta device) from the checkpoint in `model_dir`.

    our_name maps a checkpoint key (as read_header names it) to the model's name for it (None: not wanted,
    e.g. an unused LM head); `keep` names tensors the model already holds (a fresh reward head). Every name
    and shape is checked against the model from the header first, so a checkpoint that does not fit is
    refused before any data is read; then the tensors are read one at a time, each cast straight to `dtype`
    (one copy, never two): loading holds the model's own tensors plus one in flight.
    """
    header = header if header is not None else read_header(model_dir, model.config)
    keys = {our_name(key): key for key in header if our_name(key) is not None}
    check_fits(model, {name: header[key].shape for name, key in keys.items()}, keep, where=str(model_dir))
    state = {name: t for name, t in model.state_dict().items() if name in keep}
    for file in sorted({entry.file for entry in header.values()}):
        with opened(file) as f:
            for name, key in keys.items():
                if header[key].file == file:
                    t = f.get_tensor(header[key].key)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        state[name] = t.to(dtype)
                    else:  # a fresh, 64-byte aligned copy: safetensors' buffers can be misaligned, and
                        state[name] = t.clone()  # CPU kernels then round differently than for the saved model
    model.load_state_dict(state, strict=True, assign=True)  # assign: the meta parameters are replaced, not copied


def check_fits(model: nn.Module, shapes: dict, keep, where: str):
    """Refuse, in one line naming every missing, unexpected or mis-shaped tensor, a checkpoint (its
    {name: shape}) that does not fit `model` (apart from the tensors in `keep`)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in keep}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label} tensor(s): {shown}")
    if problems:
        raise UserError(f"checkpoint {where} does not fit this model: {'; '.join(problems)}; "
                        "is it a Qwen3 checkpoint of the size its config.json says?")
