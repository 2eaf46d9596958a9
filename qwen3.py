"""Qwen3, written from scratch in plain PyTorch, loading the official safetensors weights.

    x = embed_tokens(input_ids)                       # (B, T, hidden)
    for each block:
        x = x + attention(input_layernorm(x))         # pre-norm residual blocks
        x = x + mlp(post_attention_layernorm(x))
    h = norm(x)                                       # final RMSNorm -> the hidden states we return

- Grouped-query attention: 16 query heads share 8 key/value heads in the released models; head_dim (128)
  is its own field, not hidden_size / heads. q and k get an RMSNorm per head BEFORE the rotary embedding.
- RoPE in the rotate-half layout, cos/sin in fp32. SwiGLU MLP. No biases. RMSNorm computes in fp32.
- `forward` returns hidden states: a reward model never needs the LM head (`lm_logits` computes it on request).
- Batches are right padded: under a causal mask no real token sees padding, so no mask is needed and
  the fast `is_causal` kernels run. Only left padding gets an explicit mask. Padding-free packing and
  shared prompts pass a `layout` (packing.py) that changes only how attention is confined.
- Under autocast (--bf16) the residual stream is carried in bf16; in fp32 we match transformers to 1e-5.
"""
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support.errors import UserError
from support.hub import read_json, resolve_model_dir


# ----------------------------------------------------------------------------------------------
# Config


# Upper bounds far above any released Qwen3 (the 32B model: 64 layers, hidden 5120, intermediate 25600):
# enough to refuse a config that would build modules for minutes before the weights could disagree.
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
          "max_position_embeddings": 1 << 24}


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    def __post_init__(self):
        """Every field of the right type and size, before any module is built from it (a hand-edited or
        hostile config.json must not make us allocate for minutes before it is refused)."""
        for name, top in LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= top:  # type(), not isinstance: True is not a size
                raise UserError(f"{name} must be a whole number from 1 to {top:,} (got {value!r})")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 < value < float("inf"):
                raise UserError(f"{name} must be a positive number (got {value!r})")
        if type(self.tie_word_embeddings) is not bool:
            raise UserError(f"tie_word_embeddings must be true or false (got {self.tie_word_embeddings!r})")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise UserError(f"head_dim must be even (got {self.head_dim}): rotary embeddings turn pairs of features")

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config") -> "Qwen3Config":
        """Read the fields that matter from a Hugging Face Qwen3 `config.json` dict, checked."""
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
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        hidden, heads = (kwargs.get(k, getattr(cls, k)) for k in ("hidden_size", "num_attention_heads"))
        if "head_dim" not in kwargs and type(hidden) is int and type(heads) is int and heads > 0:
            kwargs["head_dim"] = hidden // heads  # older configs leave it out: then it is hidden / heads
        try:
            return cls(**kwargs)
        except UserError as e:
            raise UserError(f"{where}: {e}; correct the value or re-download the checkpoint") from None

    def to_hf_dict(self) -> dict:
        """The config.json fields transformers' Qwen3 classes need to load our weights."""
        return {"model_type": "qwen3", **asdict(self), "hidden_act": "silu", "attention_bias": False,
                "attention_dropout": 0.0, "rope_scaling": None, "use_sliding_window": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta}}

    @classmethod
    def from_name(cls, name: str) -> "Qwen3Config":
        if name not in CONFIGS:
            raise UserError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
        return CONFIGS[name]


# The released models' architectures, available without any download (from their config.json files).
CONFIGS = {
    "0.6b": Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28),
    "1.7b": Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28),
    # Tiny shapes for tests, the demo and CPU benchmarks.
    "tiny": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048),
    # ~33M parameters (25M outside the embeddings): big enough for CPU benchmarks to mean something (bench.py).
    "small": Qwen3Config(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096),
}


# ----------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under bf16 (the mean of squares loses precision otherwise),
        # cast back, THEN scale: the order transformers uses, so our outputs match bit for bit.
        # The weight is cast to the input's dtype: a no-op in fp32, and under autocast it keeps a bf16
        # residual stream in bf16 (an fp32 weight would promote the output back to fp32).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x32.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin of shape (B, T, head_dim) for the given positions, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))                          # (head_dim/2,)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq                     # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                # (B, T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, heads, T, head_dim); cos/sin: (B, T, head_dim) -> broadcast over heads
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, over head_dim
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attention=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)               # (B, heads, T, head_dim)
        if attention is None or isinstance(attention, torch.Tensor):
            # Causal over right-padded rows, or an explicit mask for left padding. enable_gqa lets each
            # group of query heads read its shared k/v head without copying k/v.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention, is_causal=attention is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads).transpose(1, 2)
        else:  # a packing.PackedAttention: packed rows or shared prompts, confined to each sequence
            y = attention.attend(q, k, v)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attention=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    """The Qwen3 backbone. Module names match the checkpoint keys minus their `model.` prefix."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None  # only materialised for untied checkpoints loaded with lm_head=True
        self.gradient_checkpointing = False
        self.packed_attention = None  # packing.py chooses per batch; or force "varlen" | "loop" | "mask"
        self.compiled = False         # set by compile_blocks

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Random init for training from scratch (the demo) and benchmarks: normal(0, std) matrices, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif gen is None:  # unseeded: draw in place, on the parameter's device (fast for big models)
                    p.normal_(0.0, std)
                else:
                    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
        return self

    def compile_blocks(self, **kwargs):
        """torch.compile each block in place ("regional" compilation). The blocks share their code, so
        one compilation serves all of them: seconds instead of minutes, and gradient checkpointing
        (per block) and packing keep working. Embedding, final norm, pooling and head stay eager."""
        for layer in self.layers:
            layer.compile(**kwargs)
        self.compiled = True
        return self

    def forward(self, input_ids, attention_mask=None, layout=None):
        """input_ids (B, T) -> final-normed hidden states (B, T, hidden).

        attention_mask (B, T), 1 = real token: only needed for batches that are not right padded.
        layout: a packing.Layout for padding-free or shared-prompt batches (packing.collate_packed,
        packing.collate_shared): it gives the positions and confines attention to each sequence.
        """
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            # Carry the residual stream in the autocast dtype (bf16), as a bf16 model does; weights,
            # gradients and optimizer state stay fp32. (transformers keeps it in fp32 here: twice the
            # activation memory and elementwise traffic.)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if layout is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            attention = None
            if attention_mask is not None and not is_right_padded(attention_mask):
                attention = left_padding_mask(attention_mask)
        else:
            position_ids = layout.position_ids
            attention = layout.attention(self, x.dtype)  # chosen once, used by every block
        # cos/sin in the residual stream's dtype, as transformers does.
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations during backward.
                x = checkpoint(layer, x, cos, sin, attention, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention)
        return self.norm(x)

    def lm_logits(self, hidden):
        """Next-token logits, computed only on request (a reward model never needs them)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=torch.float32, device="cpu", lm_head: bool = False):
        """Load a Qwen3 checkpoint from a local directory or a Hub repo id (e.g. "Qwen/Qwen3-0.6B").

        lm_head=True also loads an untied `lm_head.weight` (a tied model reuses the embeddings anyway).
        """
        model_dir = resolve_model_dir(name_or_path)
        config = read_config(model_dir)
        header = read_header(model_dir, config)  # weights that disagree with config.json: refused, nothing built
        with torch.device("meta"):  # no memory for random weights we would overwrite anyway
            model = cls(config)
            if lm_head and not config.tie_word_embeddings and "lm_head.weight" in header:
                model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def our_name(key):  # checkpoint key -> module name; an unexpected key keeps its own (and is named)
            if key == "lm_head.weight":
                return key if model.lm_head is not None else None
            return key[len("model."):] if key.startswith("model.") else key
        load_weights(model, model_dir, dtype, our_name, header=header)
        return model.to(device)


def is_right_padded(attention_mask) -> bool:
    """True when every row is real tokens followed only by padding (1...1 0...0)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def left_padding_mask(attention_mask):
    """(B, 1, T, T) bool, True = may attend: causal, and only to real tokens. A query whose row would be
    all False (a pad before any real token) attends to itself so softmax stays finite; that position's
    output is padding and never read."""
    T = attention_mask.shape[-1]
    key_is_real = attention_mask.bool()[:, None, None, :]                     # (B, 1, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal & key_is_real) | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


# ----------------------------------------------------------------------------------------------
# Checkpoint files: reading them, checking every tensor (hub.py finds them).

def read_config(model_dir: Path) -> Qwen3Config:
    d = read_json(model_dir / "config.json", "a checkpoint directory must hold the model's config.json")
    return Qwen3Config.from_hf_dict(d, where=str(model_dir / "config.json"))


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index maps every tensor to its shard, a file in this directory
        weight_map = read_json(index, "").get("weight_map")
        names = set(weight_map.values()) if isinstance(weight_map, dict) and weight_map else {None}
        if not all(isinstance(n, str) and n == Path(n).name and n.endswith(".safetensors") for n in names):
            raise UserError(f"{index} has no valid weight_map (tensor name -> shard file in this directory); "
                            "re-download the checkpoint")
        files = [model_dir / f for f in sorted(names)]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{model_dir}: shard(s) {missing} listed in model.safetensors.index.json are missing; "
                            "re-download the checkpoint")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{model_dir} holds no model.safetensors (nor an index of shards); "
                    "point at a directory with safetensors weights")


@contextmanager
def opened(file: Path):
    """safe_open, with a header or data that cannot be read (a truncated download, usually) as one line."""
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{file} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "delete it and download the checkpoint again") from None


def read_header(model_dir: Path, config: Qwen3Config) -> dict:
    """{checkpoint key: (file, shape)} from the safetensors headers alone: no tensor data is read. Weights
    whose layer count or embeddings disagree with config.json are refused here, before a model is built."""
    header = {}
    for file in safetensors_files(model_dir):
        with opened(file) as f:
            for key in f.keys():
                if key in header:
                    raise UserError(f"{model_dir}: tensor {key} is in two shards ({header[key][0].name}, "
                                    f"{file.name}); re-download the checkpoint")
                header[key] = (file, tuple(f.get_slice(key).get_shape()))
    layers = 1 + max((int(m[1]) for key in header if (m := re.match(r"model\.layers\.(\d+)\.", key))), default=-1)
    embed = header.get("model.embed_tokens.weight", (None, None))[1]
    if layers != config.num_hidden_layers or embed not in (None, (config.vocab_size, config.hidden_size)):
        raise UserError(f"{model_dir} does not match its config.json: the weights hold {layers} layers and embeddings "
                        f"of shape {embed}, config.json says {config.num_hidden_layers} layers and "
                        f"({config.vocab_size}, {config.hidden_size}); restore its config.json or re-download it")
    return header


def load_weights(model: nn.Module, model_dir: Path, dtype, our_name=lambda key: key, keep=frozenset(),
                 header: dict | None = None):
    """Fill `model` (built on the meta device) from the checkpoint in `model_dir`.

    our_name maps a checkpoint key to the model's name for it (None: not wanted, e.g. an unused LM head);
    `keep` names tensors the model already holds (a fresh reward head). Every name and shape is checked
    against the model from the header first, so a checkpoint that does not fit is refused before any data
    is read; then the tensors are read one at a time, each cast straight to `dtype` (one copy, never two):
    loading holds the model's own tensors plus one in flight.
    """
    header = header if header is not None else read_header(model_dir, model.config)
    keys = {our_name(key): key for key in header if our_name(key) is not None}
    check_fits(model, {name: header[key][1] for name, key in keys.items()}, keep, where=str(model_dir))
    state = {name: t for name, t in model.state_dict().items() if name in keep}
    for file in sorted({file for file, _ in header.values()}):
        with opened(file) as f:
            for name, key in keys.items():
                if header[key][0] == file:
                    t = f.get_tensor(key)
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
