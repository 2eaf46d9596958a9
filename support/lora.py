"""LoRA: train a low-rank update on a frozen backbone, then merge it back into plain weights.

A targeted linear layer y = x W^T keeps W frozen and learns a low-rank correction:
    y = x W^T + (alpha / r) * x A^T B^T,    A: (r, in), B: (out, r), r << min(in, out).
A starts random (like nn.Linear) and B starts at zero, so B A = 0 and training begins exactly at the base
model; the gradient of B is nonzero from the first step (it sees x A^T), and A follows once B moves.
Only A and B (and the reward head) train, so the gradients and the AdamW state (two fp32 copies of every
trainable parameter) shrink from ~3x the model to a few MB: this is most of LoRA's memory saving. The base
may be fp32, bf16 or a bitsandbytes int8 Linear8bitLt (QLoRA-style); the adapters are always fp32.
alpha / r keeps the update's size roughly independent of r, so a learning rate carries over between ranks.
To export, W' = W + (alpha / r) B A is a plain weight (int8 dequantised first): the saved model needs
no LoRA code to load, in our RewardModel or in transformers.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import fileio
from support.errors import UserError
from support.hub import read_json

# --lora_targets name -> the linear layer it means in every block (qwen3.py's Attention and MLP).
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, generator=None):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        self.dropout = nn.Dropout(dropout)
        A = torch.empty(rank, base.in_features)  # on the CPU, where the seeded generator lives
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # nn.Linear's own init
        device = base.weight.device
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    def forward(self, x):
        y = self.base(x)
        # fp32 adapters on a bf16 input: without autocast F.linear would refuse the mixed dtypes; under
        # autocast it casts both to bf16 anyway. The product is cast back to the base output's dtype.
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (update * self.scale).to(y.dtype)

    def merged_weight(self, dtype) -> torch.Tensor:
        """W + scale * B A, computed in fp32 and returned in `dtype`."""
        return (dense_weight(self.base) + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(dtype)


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight in fp32; for an int8 Linear8bitLt: int8 * per-row scale (SCB) / 127, as rm.py exports it.
    Read through state_dict: bitsandbytes moves SCB off the weight after the first forward."""
    state = linear.state_dict()
    if state["weight"].dtype == torch.int8:
        return state["weight"].float() * state["SCB"].float()[:, None] / 127
    return state["weight"].detach().float()


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """(backbone, its name prefix): a RewardModel keeps its Qwen3 at `.model`; a bare Qwen3 is its own."""
    inner = getattr(model, "model", None)
    return (inner, "model.") if isinstance(inner, nn.Module) else (model, "")


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             targets=tuple(TARGETS), seed: int = 0, base_dtype=None) -> nn.Module:
    """Wrap the targeted linears of every block in LoRALinear and freeze the rest of the backbone
    (embeddings and norms too); a reward head outside the backbone stays trainable. Returns `model`,
    its settings in `model.lora_config`. Call it after quantize_8bit and before freeze_layers (which then
    freezes those blocks' adapters). base_dtype=torch.bfloat16 (train.py's --bf16) stores the frozen block
    linears in bf16: under bf16 autocast they are cast to exactly that on every forward anyway, so the
    forward is bitwise the same and the frozen weights take half the memory."""
    targets = check_options(rank, alpha, dropout, targets)
    backbone, _ = backbone_of(model)
    layers = {f"layers.{i}.{TARGETS[t]}": block.get_submodule(TARGETS[t])
              for i, block in enumerate(backbone.layers) for t in targets}
    for where, linear in layers.items():  # check all before changing anything
        if not isinstance(linear, nn.Linear):  # Linear8bitLt is an nn.Linear too; a LoRALinear is not
            raise UserError(f"{where} is a {type(linear).__name__}, not a linear layer: add_lora applied twice?")
        if rank > min(linear.in_features, linear.out_features):
            raise UserError(f"--lora_rank {rank} is larger than {where} ({linear.in_features} -> "
                            f"{linear.out_features}); use at most {min(linear.in_features, linear.out_features)}")
    generator = torch.Generator().manual_seed(seed)
    alpha = 2 * rank if alpha is None else alpha
    for where, linear in layers.items():
        backbone.set_submodule(where, LoRALinear(linear, rank, alpha, dropout, generator))
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    if base_dtype is not None:  # the frozen block linears only; int8 layers stay int8, adapters fp32
        for m in backbone.layers.modules():
            if isinstance(m, nn.Linear) and m.weight.is_floating_point():
                m.to(base_dtype)
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": ",".join(targets)}
    return model


def check_options(rank: int, alpha, dropout: float, targets) -> list[str]:
    """The --lora_* values a model is not needed to check; returns the target names as a list."""
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    if not rank >= 1:
        raise UserError(f"--lora_rank must be at least 1, got {rank}")
    if alpha is not None and not 0 < alpha < math.inf:
        raise UserError(f"--lora_alpha must be positive and finite, got {alpha}")
    if not 0 <= dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {dropout}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise UserError(f"unknown --lora_targets {','.join(unknown) or '(none)'}; choose from {','.join(TARGETS)}")
    return targets


def merged_state_dict(model: nn.Module, dtype=None) -> dict:
    """model.state_dict() as a model without LoRA would have it: each LoRALinear becomes one
    `<name>.weight` = W + scale * B A, and every int8 layer a dequantised weight, in `dtype` (default: the
    dtype of the model's first floating-point parameter outside the adapters, i.e. the embeddings)."""
    if dtype is None:
        dtype = next(p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n)
    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            linear, weight = m.base, m.merged_weight(dtype)
        elif isinstance(m, nn.Linear) and state.get(f"{name}.weight", torch.empty(0)).dtype == torch.int8:
            linear, weight = m, dense_weight(m).to(dtype)
        else:
            continue  # plain layers stay as they are; a LoRALinear's base was merged with it already
        for key in [k for k in state if k.startswith(f"{name}.")]:  # lora_A/B, base.*, SCB, weight_format
            del state[key]
        state[f"{name}.weight"] = weight.contiguous()
        if linear.bias is not None:
            state[f"{name}.bias"] = linear.bias.detach()
    return state


def is_adapter_or_head(name: str, backbone_prefix: str) -> bool:
    return "lora_" in name or (backbone_prefix != "" and not name.startswith(backbone_prefix))


def adapter_state_dict(model: nn.Module) -> dict:
    """The small part of a LoRA model that training changes: every adapter, plus the reward head."""
    _, prefix = backbone_of(model)
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_or_head(n, prefix)}


def load_adapter_state_dict(model: nn.Module, state: dict, where: str = "adapter checkpoint"):
    """Copy `state` (from adapter_state_dict) into the model, after checking names and shapes match."""
    params = dict(model.named_parameters())
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where} does not match the model's LoRA layout: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]} (different --lora_rank/--lora_targets or --head?)")
    for name, t in state.items():
        if t.shape != params[name].shape:
            raise UserError(f"{where}: {name} has shape {tuple(t.shape)}, the model expects "
                            f"{tuple(params[name].shape)} (different --lora_rank?)")
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
    return model


# ---- adapters on disk: checkpoints and --save_adapters ---------------------------------------------
# Two layouts, told apart by their files:
# - PEFT's, for a reward model transformers has (a linear `score` head with last-token pooling, i.e.
#   Qwen3ForSequenceClassification): adapter_model.safetensors with PEFT's key names and PEFT's
#   adapter_config.json, so `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
#   BASE, num_labels=1), DIR)` loads it as it is; the head goes in as `modules_to_save: ["score"]`.
# - our own, for any head and pooling (checkpoints always use it): rm_adapters.safetensors, the adapters and
#   the head under their module names. Older runs wrote it as adapter_model.safetensors + adapter_config.json
#   with "format": "qwen3-rm-lora"; those still load.
# Beside either, rm_adapter_config.json: add_lora's settings and which base they belong to (base_model, and
# a fingerprint of its weights: a different base of the same shape, another fine-tune, would load silently
# and give wrong rewards, so it is refused). PEFT ignores that file; a PEFT directory written by PEFT itself
# has none, so its base cannot be checked.

OWN_FILE, OWN_CONFIG = "rm_adapters.safetensors", "rm_adapter_config.json"
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX, PEFT_HEAD = "base_model.model.", "base_model.model.score.weight"


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the backbone's weights as loaded (call it before quantize_8bit or any cast): every
    tensor's name, shape and up to ~8k of its values, evenly strided. Cheap (milliseconds for 1.7B) and
    enough to tell one checkpoint from another, since fine-tuning moves nearly every weight."""
    import hashlib
    backbone, _ = backbone_of(model)
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def peft_compatible(model: nn.Module) -> bool:
    """transformers has this reward model (Qwen3ForSequenceClassification), so PEFT can load its adapters."""
    return getattr(model, "head_type", None) == "linear" and getattr(model, "pooling", None) == "last"


def save_adapters(model: nn.Module, out_dir, peft: bool = False):
    """Write the adapters and the head to out_dir (atomically), with model.lora_config (add_lora's settings
    plus what train.py adds: base_model, base_fingerprint, base_8bit) as rm_adapter_config.json; in PEFT's
    layout too with peft=True (peft_compatible models only)."""
    from safetensors.torch import save_file

    from support.fileio import atomic_dir, write_json
    state = {n: t.contiguous() for n, t in adapter_state_dict(model).items()}
    with atomic_dir(out_dir) as tmp:
        if peft:
            save_file({peft_name(n): t for n, t in state.items()}, tmp / PEFT_FILE, metadata={"format": "pt"})
            write_json(tmp / PEFT_CONFIG, peft_config(model.lora_config))
        else:
            save_file(state, tmp / OWN_FILE, metadata={"format": "pt"})
        write_json(tmp / OWN_CONFIG, {"format": "qwen3-rm-lora", **model.lora_config})


def export_adapters(model: nn.Module, out_dir) -> str:
    """train.py --save_adapters: PEFT's layout where transformers has the model, else ours. Returns the
    line to print once it is saved."""
    peft = peft_compatible(model)
    save_adapters(model, out_dir, peft=peft)
    if peft:
        return f"adapters saved to {out_dir} in PEFT's layout (PeftModel.from_pretrained on the base loads them)"
    return (f"adapters saved to {out_dir} in this project's layout ({OWN_FILE}; load with support.lora."
            f"apply_adapters): PEFT cannot load them, since transformers has no model with the "
            f"{model.head_type} head and {model.pooling} pooling (only --head linear --pooling last)")


def peft_name(name: str) -> str:
    """Our module name -> PEFT's key: model.layers.0.self_attn.q_proj.lora_A -> base_model.model.model.
    layers.0.self_attn.q_proj.lora_A.weight; the linear head -> base_model.model.score.weight."""
    return PEFT_HEAD if name == "head.weight" else f"{PEFT_PREFIX}{name}.weight"


def peft_config(lora_config: dict) -> dict:
    """PEFT's adapter_config.json for add_lora's settings (LoraConfig's fields, PEFT's defaults elsewhere)."""
    return {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": lora_config.get("base_model"),
            "r": lora_config["rank"], "lora_alpha": lora_config["alpha"], "lora_dropout": lora_config["dropout"],
            "target_modules": sorted(TARGETS[t].split(".")[-1] for t in lora_config["targets"].split(",")),
            "modules_to_save": ["score"], "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def from_peft(config: dict, state: dict, where) -> tuple[dict, dict]:
    """A PEFT LoRA adapter directory's (config, tensors) as ours: add_lora's settings, our module names.
    Only what LoRALinear computes is accepted: plain LoRA (alpha / r scaling) on our target layers."""
    leaf = {TARGETS[t].split(".")[-1]: t for t in TARGETS}  # q_proj -> q
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets or any(t not in leaf for t in targets):
        raise UserError(f"{where}: target_modules {targets!r:.80} are not a list of {sorted(leaf)}")
    plain = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False}
    unsupported = [k for k, v in plain.items() if config.get(k, v) != v]
    unsupported += [k for k in ("layers_to_transform", "rank_pattern", "alpha_pattern") if config.get(k)]
    if type(config.get("r")) is not int or type(config.get("lora_alpha")) not in (int, float):
        unsupported.append(f"r {config.get('r')!r:.20} and lora_alpha {config.get('lora_alpha')!r:.20}")
    # modules_to_save is not checked by name: PEFT adds its own defaults for SEQ_CLS ("classifier", and since
    # 0.22 "pre_classifier"); the tensors below are, and only the score head's may be among them.
    if config.get("peft_type") != "LORA" or unsupported:
        raise UserError(f"{where}: a PEFT adapter this loader does not support (peft_type "
                        f"{config.get('peft_type')!r}{''.join(', ' + u for u in unsupported)}); plain LoRA "
                        "on q,k,v,o,gate,up,down_proj with the score head only")
    ours = {}
    for key, t in state.items():
        if key == PEFT_HEAD:
            ours["head.weight"] = t
        elif key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight")):
            ours[key[len(PEFT_PREFIX):-len(".weight")]] = t
        else:
            raise UserError(f"{where}: unexpected tensor {key!r:.100} in {PEFT_FILE}")
    settings = {"rank": config.get("r"), "alpha": config.get("lora_alpha"), "dropout": config.get("lora_dropout", 0.0),
                "targets": ",".join(leaf[t] for t in sorted(targets, key=list(leaf).index)),
                "base_model": config.get("base_model_name_or_path")}
    return settings, ours


def settings_file(adapter_dir) -> Path:
    """The file that holds an adapter directory's settings: ours, or an older run's adapter_config.json."""
    d = Path(adapter_dir)
    return d / (OWN_CONFIG if fileio.is_regular_file(d / OWN_CONFIG) else PEFT_CONFIG)


def read_adapters(adapter_dir) -> tuple[dict, dict]:
    """(settings, the tensors under our module names) of an adapter directory in any layout above."""
    from safetensors.torch import load_file
    d = Path(adapter_dir)
    own = fileio.is_regular_file(d / OWN_FILE)
    config_file, tensor_file = settings_file(d), d / (OWN_FILE if own else PEFT_FILE)
    if not (fileio.is_regular_file(tensor_file) and fileio.is_regular_file(config_file)):
        raise UserError(f"{d} holds no LoRA adapters ({OWN_FILE} or {PEFT_FILE}, with {OWN_CONFIG} or {PEFT_CONFIG})")
    config = read_json(config_file, "")  # bounded, and an object
    try:
        state = load_file(tensor_file)
    except Exception as e:  # unreadable: truncated or edited by hand
        raise UserError(f"{d}: cannot read the adapters ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    peft = {} if own or not fileio.is_regular_file(d / PEFT_CONFIG) else \
        config if config_file.name == PEFT_CONFIG else read_json(d / PEFT_CONFIG, "")  # read once
    if "peft_type" in peft:  # PEFT's tensors; our settings beside them when we wrote them
        settings, state = from_peft(peft, state, d)
        if config_file.name == PEFT_CONFIG:
            return settings, state
    if config.get("format") != "qwen3-rm-lora":
        raise UserError(f"{config_file} is not an adapter config written by train.py")
    return config, state


def check_base(config: dict, fingerprint: str, where):
    """Refuse adapters trained on another base model than the one loaded (fingerprint from base_fingerprint).
    PEFT's own files carry no fingerprint: nothing to check."""
    if "base_fingerprint" in config and config.get("base_fingerprint") != fingerprint:
        raise UserError(f"{where} was trained on another base model: {config.get('base_model')!r} with fingerprint "
                        f"{config.get('base_fingerprint')}, but the base loaded now has {fingerprint}; load "
                        "the base model it was trained on")


def apply_adapters(model: nn.Module, adapter_dir) -> nn.Module:
    """A base reward model (from RewardModel.from_pretrained, with the adapters' head and pooling) plus
    the adapters saved by train.py --save_adapters (or by PEFT): the trained model, unmerged. int8 bases
    are quantised again first, as in training. PEFT adapters without the score head keep the base's head."""
    config, state = read_adapters(adapter_dir)
    check_base(config, base_fingerprint(model), adapter_dir)
    if config.get("base_8bit"):
        model.quantize_8bit()
    add_lora(model, config["rank"], config["alpha"], config["dropout"], config["targets"])
    if not any(n.startswith("head.") for n in state):
        state = {**state, **{n: t for n, t in adapter_state_dict(model).items() if n.startswith("head.")}}
    load_adapter_state_dict(model, state, where=str(adapter_dir))
    return model.eval()
