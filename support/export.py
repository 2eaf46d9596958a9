"""The reward model on disk: the directory rm.RewardModel saves and loads, readable by transformers too.

- Key names: the backbone's tensors keep transformers' `model.*` names; the head is saved as
  `reward_head.*` (mlp) or `score.weight` (linear, as Qwen3ForSequenceClassification names it).
- config.json: the Qwen3 fields, plus a "reward_model" entry {"head", "pooling", how it was trained...}
  (`hf_config`). The linear head with last-token pooling is saved as a Qwen3ForSequenceClassification;
  any other combination gets model_type REWARD_MODEL_TYPE, which transformers refuses to load rather
  than load a classifier with a random `score` layer. Reading it back (`reward_model_config`) checks
  every saved setting a later run uses.
- Weights are plain tensors (`export_state_dict`): int8 layers dequantised, LoRA adapters merged.
- `load` reads any of the three kinds of checkpoint a RewardModel can start from.
- `quantize_linears_8bit`: the LLM.int8() layers of `RewardModel.quantize_8bit`.
The RewardModel class itself stays in rm.py: these functions take it (or an instance) as an argument.
"""
import os
from pathlib import Path

import torch
import torch.nn as nn

from support import hub, scoring, weights
from support.errors import UserError
from support.fileio import atomic_dir, is_regular_file, write_json
from support.lora import merged_state_dict
from support.tokenizer import Tokenizer

HEADS = ("mlp", "linear")       # rm.MLPHead; a bias-free nn.Linear (transformers' `score`)
POOLINGS = ("mean", "last")     # rm.pool's two ways
REWARD_MODEL_TYPE = "qwen3_reward_model"  # a model_type transformers does not know: it refuses the directory


# ----------------------------------------------------------------------------------------------
# Key names

def disk_name(name: str) -> str:
    """Module name -> checkpoint key: the head is saved as `reward_head.*` (mlp) or `score.weight`
    (linear, as transformers' Qwen3ForSequenceClassification names it)."""
    if name == "head.weight":
        return "score.weight"
    return "reward_head." + name[len("head."):] if name.startswith("head.") else name


def module_name(key: str) -> str:
    """Checkpoint key -> module name (the inverse of disk_name)."""
    if key == "score.weight":
        return "head.weight"
    return "head." + key[len("reward_head."):] if key.startswith("reward_head.") else key


# ----------------------------------------------------------------------------------------------
# config.json

def is_name_or_names(value) -> bool:
    """A string, or a list of strings (a dataset given as one name or several)."""
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


# What a saved "reward_model" entry records of the training that eval.py reads back: the check each value
# must pass (None is always fine: not recorded).
SAVED_SETTINGS = {"max_length": ("a whole number >= 2", lambda v: type(v) is int and v >= 2),
                  "share_prompt": ("true or false", lambda v: type(v) is bool),
                  "dataset": ("a name or a list of names", is_name_or_names),
                  "eval_dataset": ("a name or a list of names", is_name_or_names),
                  "reward_stats": ('{"mean", "std" > 0, "n"}', scoring.valid_stats),
                  "eval_fraction": ("a number between 0 and 1", lambda v: type(v) in (int, float) and 0 < v < 1)}


def reward_model_config(raw_config: dict, where) -> dict | None:
    """What a config.json says about the reward model in its directory: our {"head", "pooling", provenance...}
    entry, {"head": "linear", "pooling": "last"} for a transformers Qwen3ForSequenceClassification, or None
    for a plain language model (whose reward head would have to be freshly initialised)."""
    saved = raw_config.get("reward_model")
    architectures = raw_config.get("architectures") or []
    if saved is None and isinstance(architectures, list) and "Qwen3ForSequenceClassification" in architectures:
        id2label = raw_config.get("id2label") or {"0": ""}
        num_labels = len(id2label) if isinstance(id2label, dict) else None
        if num_labels != 1:
            raise UserError(f"{where} is a sequence classifier with {num_labels} labels; a reward "
                            "model has exactly one output")
        return {"head": "linear", "pooling": "last"}
    if saved is None:
        return None
    if not isinstance(saved, dict) or saved.get("head") not in HEADS or saved.get("pooling") not in POOLINGS:
        raise UserError(f"{where}: its \"reward_model\" entry {saved!r:.200} needs a head in {HEADS} and a pooling "
                        f"in {POOLINGS}; re-save the model with train.py")
    for key, (what, ok) in SAVED_SETTINGS.items():
        if saved.get(key) is not None and not ok(saved[key]):
            raise UserError(f"{where}: its \"reward_model\" entry has {key} {saved[key]!r:.100}, which must be "
                            f"{what}; correct it in config.json or re-save the model with train.py")
    return saved


def hf_config(model) -> dict:
    """config.json of a RewardModel: transformers' Qwen3 fields, the tokenizer's ids, the "reward_model" entry."""
    cfg = model.config.to_hf_dict()
    tok = model.tokenizer
    if (model.head_type, model.pooling) == ("linear", "last"):
        # transformers' Qwen3ForSequenceClassification reads these; it pools the last token that is
        # not pad_token_id, which is our last token: we never append an eos equal to pad (eos_suffix).
        cfg.update(architectures=["Qwen3ForSequenceClassification"], id2label={"0": "LABEL_0"},
                   label2id={"LABEL_0": 0})
    else:  # transformers has no such head: refuse to load there, rather than load a random `score` layer
        cfg.update(model_type=REWARD_MODEL_TYPE, architectures=["Qwen3RewardModel"])
    cfg.update(pad_token_id=tok.pad_id if tok else None, eos_token_id=tok.eos_id if tok else None,
               bos_token_id=tok.bos_id if tok else None,
               torch_dtype=str(model.model.norm.weight.dtype).replace("torch.", ""),
               reward_model={"head": model.head_type, "pooling": model.pooling, **model.provenance},
               **scoring.config_keys(model.reward_stats))  # OpenRLHF's names for them
    return cfg


# ----------------------------------------------------------------------------------------------
# Saving and loading

def export_state_dict(model) -> dict:
    """A RewardModel's state dict in plain tensors under the checkpoint key names, loadable without this
    code: int8 layers are dequantised back to ordinary weights (with the small int8 rounding baked in) and
    LoRA adapters merged into the weights they adapt, W + (alpha/r) B A (lora.merged_state_dict)."""
    merged = merged_state_dict(model, dtype=model.model.norm.weight.dtype)
    return {disk_name(n): t.detach().contiguous() for n, t in merged.items()}


def save(model, out_dir, extra_files: dict | None = None) -> Path:
    """Write model.safetensors, config.json and the tokenizer files into a temporary sibling directory
    that is renamed into place only when complete (fileio.atomic_dir)."""
    from safetensors.torch import save_file
    check_path("save_pretrained", "out_dir", out_dir)
    if extra_files is not None and not (isinstance(extra_files, dict) and all(
            isinstance(name, str) and callable(write) for name, write in extra_files.items())):
        raise UserError("save_pretrained: extra_files must be None or a dict {file name: function(path) that "
                        "writes it}, e.g. {\"notes.txt\": lambda path: path.write_text(\"...\")}")
    with atomic_dir(out_dir) as tmp:
        save_file(export_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        write_json(tmp / "config.json", hf_config(model))  # last: marks the directory complete
    return Path(out_dir)


def load(reward_model_class, name_or_path: str, head: str | None, pooling: str | None, dtype, device, seed: int):
    """RewardModel.from_pretrained: one of three kinds of checkpoint, each checked before a model is built
    (a plain language model gets a fresh head, seeded)."""
    check_load_arguments(name_or_path, head, pooling, dtype, device, seed)
    model_dir = hub.resolve_model_dir(str(name_or_path))
    raw = weights.read_config(model_dir)
    saved = reward_model_config(raw, model_dir)
    backbone = {**raw, "model_type": "qwen3"} if saved and raw.get("model_type") == REWARD_MODEL_TYPE else raw
    config = reward_model_class.config_class.from_hf_dict(backbone, where=str(model_dir / "config.json"))
    if saved is not None:
        for what, asked in (("head", head), ("pooling", pooling)):
            if asked is not None and asked != saved[what]:
                raise UserError(f"{model_dir} was saved with {what} {saved[what]!r}; it cannot be loaded "
                                f"with {what} {asked!r}; leave {what} unset (config.json says it)")
        head, pooling = saved["head"], saved["pooling"]
    header = weights.read_header(model_dir, config)  # weights that disagree with config.json: refused, nothing built
    with torch.device("meta"):
        model = reward_model_class(config, head=head or "mlp", pooling=pooling or "mean")
    fresh = set()
    if saved is None:  # a plain language model: a fresh head
        model.head.to_empty(device="cpu")
        model.init_head(seed)
        fresh = {name for name in model.state_dict() if name.startswith("head.")}
    # a reward model never uses the LM head
    weights.load_weights(model, model_dir, dtype, lambda key: None if key == "lm_head.weight" else module_name(key),
                         keep=fresh, header=header)
    model.to(dtype=dtype)
    if saved is not None:
        model.provenance = {k: v for k, v in saved.items() if k not in ("head", "pooling")}
    if is_regular_file(model_dir / "tokenizer.json"):  # a FIFO there: refused, naming it
        model.tokenizer = Tokenizer.from_dir(model_dir)
        if model.tokenizer.vocab_size > config.vocab_size:  # its ids would index past the embeddings
            raise UserError(f"{model_dir}/tokenizer.json has {model.tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {config.vocab_size}: the tokenizer belongs to another model; "
                            "copy the base model's tokenizer files there")
    return model.to(device)


def check_path(call: str, name: str, value):
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UserError(f"{call}: {name}={value!r:.100} must be a directory path (a str or a pathlib.Path)")


def check_load_arguments(name_or_path, head, pooling, dtype, device, seed):
    """RewardModel.from_pretrained's arguments, each refused in one line naming it, before anything is read."""
    check_path("from_pretrained", "name_or_path", name_or_path)
    for name, value, choices in (("head", head, HEADS), ("pooling", pooling, POOLINGS)):
        if value is not None and value not in choices:
            raise UserError(f"from_pretrained: {name}={value!r} is not one of {choices}; or leave it None (a saved "
                            f"reward model says its own)")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(f"from_pretrained: dtype={dtype!r} must be a floating-point torch dtype, e.g. torch.float32 "
                        "or torch.bfloat16")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError):
        raise UserError(f"from_pretrained: device={device!r} is not a torch device; use \"cpu\", \"cuda\", "
                        "\"cuda:1\" or a torch.device") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"from_pretrained: device={device!r} but torch sees no CUDA GPU; use device=\"cpu\"")
    if not scoring.is_whole(seed):
        raise UserError(f"from_pretrained: seed={seed!r} must be an int (it seeds a fresh head)")


# ----------------------------------------------------------------------------------------------
# 8-bit

def quantize_linears_8bit(module: nn.Module, threshold: float = 6.0) -> nn.Module:
    """Every nn.Linear inside `module` becomes a frozen int8 bitsandbytes Linear8bitLt (LLM.int8(): outlier
    features above `threshold` stay in 16-bit)."""
    import bitsandbytes as bnb
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False,
                                        has_fp16_weights=False, threshold=threshold)
                q.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
                setattr(parent, name, q.to(child.weight.device))  # .to() quantises the CPU weights to int8
    return module
