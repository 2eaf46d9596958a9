"""Qwen3, written from scratch in plain PyTorch, loading the official safetensors weights.

    x = embed_tokens(input_ids)                       # (B, T, hidden)
    for each block:
        x = x + attention(input_layernorm(x))         # pre-norm residual blocks
        x = x + mlp(post_attention_layernorm(x))
    h = norm(x)                                       # final RMSNorm -> the hidden states we return

- Attention is softmax(q k^T / sqrt(head_dim) + mask) v, mask 0 where a query may look and -inf elsewhere
  (causal): `reference_attention` writes it out, and tests hold the fused kernel (SDPA) to it.
- Grouped-query attention: 16 query heads share 8 key/value heads in the released models; head_dim (128)
  is its own field, not hidden_size / heads. q and k get an RMSNorm per head BEFORE the rotary embedding.
- RoPE in the rotate-half layout: cos/sin computed in fp32, then cast to the residual stream's dtype, as
  transformers does. SwiGLU MLP. No biases. RMSNorm computes in fp32.
- `forward` returns hidden states: a reward model never needs the LM head (`lm_logits` computes it on request).
- Batches are right padded: under a causal mask no real token sees padding, so no mask is needed and
  the fast `is_causal` kernels run. Only left padding gets an explicit mask. Padding-free packing and
  shared prompts pass a `layout` (support/packing.py) that changes only how attention is confined.
- Under autocast (--bf16) the residual stream is carried in bf16; in fp32 we match transformers to 1e-5.
- The shapes (Qwen3Config, SHAPES) and config.json in and out come last, after the model.
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from support import hub, weights
from support.errors import UserError


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
    """cos, sin of shape (B, T, head_dim) for the given positions, computed in fp32, returned in `dtype`."""
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


def reference_attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(d) + mask) v, written out: what F.scaled_dot_product_attention computes, fused.
    q (B, H, T, d); k, v (B, H_kv, T, d); allowed (B, 1, T, T) bool, True = may attend (default causal)."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # H / H_kv query heads per kv head
    if allowed is None:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                 # (B, H, T, T)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v        # (B, H, T, d)


class Attention(nn.Module):
    def __init__(self, cfg: "Qwen3Config"):
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
            # reference_attention, fused: causal over right-padded rows, or an explicit mask for left padding.
            # enable_gqa lets each group of query heads read its shared k/v head without copying k/v.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention, is_causal=attention is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads).transpose(1, 2)
        else:  # a packing.PackedAttention: packed rows or shared prompts, confined to each sequence
            y = attention.attend(q, k, v)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: "Qwen3Config"):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: "Qwen3Config"):
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

    def __init__(self, config: "Qwen3Config"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None  # only materialised for untied checkpoints loaded with lm_head=True
        self.gradient_checkpointing = False
        self.packed_attention = None  # support/packing.py chooses per batch; or force "varlen" | "loop" | "mask"
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
        model_dir = hub.resolve_model_dir(name_or_path)
        config = Qwen3Config.from_hf_dict(weights.read_config(model_dir), where=str(model_dir / "config.json"))
        header = weights.read_header(model_dir, config)  # weights that disagree with config.json: refused, nothing built
        with torch.device("meta"):  # no memory for random weights we would overwrite anyway
            model = cls(config)
            if lm_head and not config.tie_word_embeddings and "lm_head.weight" in header:
                model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        def our_name(key):  # checkpoint key -> module name; an unexpected key keeps its own (and is named)
            if key == "lm_head.weight":
                return key if model.lm_head is not None else None
            return key.removeprefix("model.")
        weights.load_weights(model, model_dir, dtype, our_name, header=header)
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
# Config: the shapes, checked, and config.json in and out (read by Qwen3.from_pretrained)


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
        # Every field of the right type and size before any module is built from it (weights.LIMITS).
        weights.check_config(self)

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config") -> "Qwen3Config":
        """Read the fields that matter from a Hugging Face Qwen3 `config.json` dict, checked."""
        kwargs = weights.config_fields(cls, d, where)  # refuses other models, biases, scaled RoPE
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
        if name not in SHAPES:
            raise UserError(f"unknown model config {name!r}; choose one of {sorted(SHAPES)}")
        return replace(SHAPES[name])  # a copy: changing it must not change SHAPES


# Named shapes: the released models' architectures, available without any download (from their
# config.json files), and tiny ones for tests, the demo and benchmarks.
SHAPES = {
    "0.6b": Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28),
    "1.7b": Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28),
    # Tiny shapes for tests, the demo and CPU benchmarks.
    "tiny": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048),
    # ~33M parameters (25M outside the embeddings): big enough for CPU benchmarks to mean something (tools/bench.py).
    "small": Qwen3Config(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096),
}
