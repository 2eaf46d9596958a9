"""Qwen3, written from scratch in plain PyTorch, loading the official safetensors weights.

The architecture follows transformers' `modeling_qwen3.py` exactly (we test against it):

    x = embed_tokens(input_ids)                       # (B, T, hidden)
    for each block:
        x = x + attention(input_layernorm(x))         # pre-norm residual blocks
        x = x + mlp(post_attention_layernorm(x))
    h = norm(x)                                       # final RMSNorm -> the hidden states we return

- RMSNorm computes in fp32, casts back to the input dtype, then multiplies by its weight.
- Attention is grouped-query (GQA): 16 query heads share 8 key/value heads in the released models.
  `head_dim` (128) is NOT hidden_size / num_heads (1024 / 16 = 64 for 0.6B): it is its own field.
  q and k each get an RMSNorm over head_dim, per head, BEFORE the rotary embedding.
- Rotary embeddings (RoPE) use the rotate-half (non-interleaved) layout, cos/sin computed in fp32.
- MLP is SwiGLU: down(silu(gate(x)) * up(x)). No biases anywhere.

A reward model never needs the LM head (151,936 x hidden, about a quarter of Qwen3-0.6B's forward
FLOPs), so `forward` returns hidden states and the LM head is computed only by `lm_logits` on request.

Padding. Batches here are RIGHT padded. Under a causal mask a real token only ever attends to earlier
positions, which are all real too, so right padding cannot change any real token's hidden state: we
can skip the padding mask entirely and use the fast `is_causal=True` attention kernels. Only a batch
that is not right padded (left padding, holes) gets an explicit mask.

Packing (padding-free). Several sequences can share one row: pass `position_ids` that restart at 0 for
each sequence (and, from data.collate_packed, `cu_seqlens`/`max_seqlen`: where the sequences start).
Attention is then confined to each sequence, in one of three ways (`python bench.py --attention`,
numbers in BENCHMARKS.md; forward+backward of one layer over 16 hh-rlhf-like sequences):
- "varlen" (CUDA, bf16/fp16): torch's flash-attention kernel over the flattened sequences
  (torch.nn.attention.varlen): no mask, O(L) memory, and it compiles. H100, 0.6B's heads: 1.74 ms,
  against 2.20 ms for the dense mask and 8.05 ms for the loop.
- "loop" (CPU; fp32 on CUDA): ordinary causal SDPA on each sequence in turn. 2 CPU cores, 8/4 x 64 heads:
  376 ms, against 2,875 ms for the dense mask (one row) and 750 ms for the padded batch.
- "mask" (compiled blocks without "varlen", e.g. on CPU): a dense block-diagonal causal mask built
  from the positions (`packed_attention_mask`). O(L^2) memory and no flash kernel, but traceable.
`Qwen3.packed_attention` can force one (the tests check that they agree with the padded path).

Shared prompt. A pair's two sequences start with the same prompt, and under a causal mask the prompt's
hidden states are the same in both, so its tokens can go through the model once (data.collate or
data.collate_packed with share_prompt=True): projections, MLPs and norms run on those tokens; attention
alone copies the prompt's q/k/v into both sequences (padded or packed rows, `SharedPrompt`), runs as
above, and each token takes its output back from one copy.

Mixed precision. Under autocast (train.py --bf16) the weights, gradients and optimizer state stay fp32
but the residual stream is carried in bf16, as in a bf16 model (transformers keeps it in fp32 there).
In fp32 nothing changes: outputs match transformers to 1e-5.
"""
import inspect
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import UserError



_VARLEN = None  # (varlen_attn, its parameters) once varlen_kernel() has looked


def varlen_kernel():
    """(varlen_attn, its parameters): torch's flash attention over packed sequences (CUDA only; torch
    >= 2.10), or (None, {}). Imported on first use: the import pulls in torch.compile's machinery, about
    a second at every start of every command otherwise. (A plain global, not functools.cache, so that
    compiled blocks trace straight through it.)"""
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
            _VARLEN = varlen_attn, inspect.signature(varlen_attn).parameters
        except ImportError:
            _VARLEN = None, {}
    return _VARLEN


# ----------------------------------------------------------------------------------------------
# Config


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
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")

    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config") -> "Qwen3Config":
        """Read the fields that matter from a Hugging Face Qwen3 `config.json` dict."""
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
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(f"{where} uses rope scaling {rope}, which is not supported; "
                            "use a checkpoint without rope scaling")
        d = {**d, "rope_theta": d.get("rope_theta") or rope.get("rope_theta")}
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if "head_dim" not in kwargs:  # older configs leave it out: then it is hidden / heads
            kwargs["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        return cls(**kwargs)

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


def packed_attention_mask(position_ids):
    """Block-diagonal causal mask for packed rows: token i may attend to token j iff both belong to
    the same sequence and j <= i. A new sequence starts wherever the position id drops to 0.
    position_ids (B, T) -> bool mask (B, 1, T, T), True = may attend."""
    doc = (position_ids == 0).cumsum(-1)                                       # (B, T) sequence index
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool,
                        device=position_ids.device).tril()
    return (same_doc & causal)[:, None]


class Segments(NamedTuple):
    """Where the sequences of a packed batch lie in its flattened rows (each row's padding is a segment too)."""
    cu_seqlens: torch.Tensor        # (S+1,) int32 on the model's device: segment k is tokens [cu[k], cu[k+1])
    max_seqlen: int                 # the longest segment
    lengths: list | None            # the segment lengths on the host, for the "loop" implementation


class SharedPrompt(NamedTuple):
    """A shared-prompt batch (data.collate / data.collate_packed with share_prompt=True): the model's N
    tokens hold each pair's prompt once; attention runs on the "sequence layout" (R, L), every sequence
    whole (padded rows, or packed rows described by Segments)."""
    expand: torch.Tensor            # (R, L): the token each position of the sequence layout copies
    keep: torch.Tensor              # (N,): the position of the sequence layout each token takes its output from


def gather_tokens(x, index):
    """x (B, T, ...) -> (*index.shape, ...): the tokens of x at the flat positions `index` (into B*T)."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[2:])


def segments_from_positions(position_ids) -> tuple:
    """cu_seqlens, max_seqlen from positions that restart at 0 for every sequence (a host sync)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
    cu = torch.tensor(starts, dtype=torch.int32, device=position_ids.device)
    return cu, max(b - a for a, b in zip(starts, starts[1:]))


def varlen_attention(q, k, v, seg: Segments):
    """Causal flash attention within each segment. q (N, heads, hd), k/v (N, kv_heads, hd) -> (N, heads, hd)."""
    varlen_attn, params = varlen_kernel()
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch 2.11+ / 2.10
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of its k/v head
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_seqlen, seg.max_seqlen, **kwargs)


def looped_attention(q, k, v, seg: Segments):
    """Causal SDPA on each segment in turn. q (N, heads, hd), k/v (N, kv_heads, hd) -> (N, heads, hd)."""
    out, t = [], 0
    for n in seg.lengths:
        qs, ks, vs = (x[t:t + n].transpose(0, 1)[None] for x in (q, k, v))           # (1, heads, n, hd)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                  enable_gqa=ks.shape[1] != qs.shape[1])[0].transpose(0, 1))
        t += n
    return torch.cat(out, dim=0)


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

    def forward(self, x, cos, sin, attn_mask=None, segments: Segments | None = None,
                shared: SharedPrompt | None = None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)               # (B, heads, T, head_dim)
        if shared is not None:  # the prompt's q/k/v copied into both sequences of its pair: (R, heads, L, head_dim)
            q, k, v = (gather_tokens(t.transpose(1, 2), shared.expand).transpose(1, 2) for t in (q, k, v))
        R, L = q.shape[0], q.shape[2]
        if segments is None:  # padded rows, or packed rows with a dense mask
            # enable_gqa lets each group of query heads read its shared k/v head without copying k/v.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads).transpose(1, 2)
        else:  # packed: all rows' tokens end to end, (R*L, heads, head_dim)
            q, k, v = (t.transpose(1, 2).reshape(R * L, t.shape[1], self.head_dim) for t in (q, k, v))
            attend = varlen_attention if segments.lengths is None else looped_attention
            y = attend(q, k, v, segments)
        y = y.reshape(R * L, self.n_heads * self.head_dim)
        if shared is not None:  # each token takes its output from one copy (the gradient flows back to both)
            y = y.index_select(0, shared.keep)
        return self.o_proj(y.view(B, T, self.n_heads * self.head_dim))


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

    def forward(self, x, cos, sin, attn_mask=None, segments=None, shared=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, segments, shared)
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
        self.packed_attention = None  # None = choose per batch; or force "varlen" | "loop" | "mask"
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

    def packing_impl(self, device, dtype) -> str:
        """Which packed-attention implementation this batch gets (see the module docstring)."""
        if self.packed_attention is not None:
            return self.packed_attention
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and varlen_kernel()[0] is not None:
            return "varlen"
        return "mask" if self.compiled or torch.compiler.is_compiling() else "loop"

    def forward(self, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                expand_index=None, keep_index=None, expanded_position_ids=None):
        """input_ids (B, T) -> final-normed hidden states (B, T, hidden).

        attention_mask (B, T), 1 = real token: only needed for batches that are not right padded.
        position_ids (B, T): for packed rows, positions restarting at 0 for every sequence.
        cu_seqlens (S+1,), max_seqlen: optional, where those sequences lie in the flattened rows
        (data.collate_packed gives them; otherwise they are read off position_ids).
        expand_index (R, L), keep_index (N,): a shared-prompt batch (data.collate or data.collate_packed
        with share_prompt=True; see SharedPrompt): input_ids/position_ids (1, N) are its tokens, each
        pair's prompt once, and attention runs on the sequence layout (R, L): right-padded rows when
        expanded_position_ids is None (data.collate), else packed rows with these positions
        (data.collate_packed; cu_seqlens/max_seqlen then describe that layout).
        """
        B, T = input_ids.shape
        attn_mask, segments, shared = None, None, None
        if expand_index is not None:
            if position_ids is None or keep_index is None:
                raise ValueError("a shared-prompt batch needs position_ids, expand_index and keep_index together "
                                 "(data.collate / data.collate_packed with share_prompt=True give them)")
            shared = SharedPrompt(expand_index, keep_index)
        # The positions attention sees: packed rows have them; right-padded rows need no mask.
        attention_positions = position_ids if shared is None else expanded_position_ids
        if attention_positions is not None:
            device = input_ids.device
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
                else self.embed_tokens.weight.dtype
            impl = self.packing_impl(device, dtype)
            if impl == "mask":
                attn_mask = packed_attention_mask(attention_positions)
            else:
                if cu_seqlens is None:
                    cu_seqlens, max_seqlen = segments_from_positions(attention_positions)
                cu_seqlens = cu_seqlens.to(device, torch.int32)
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if impl == "loop" else None
                segments = Segments(cu_seqlens, int(max_seqlen), lengths)
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            if attention_mask is not None and not is_right_padded(attention_mask):
                key_is_real = attention_mask.bool()[:, None, None, :]          # (B, 1, 1, T)
                causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
                # A query whose row would be all False (a pad before any real token) attends to itself
                # so softmax stays finite; that position's output is padding and never read.
                attn_mask = (causal & key_is_real) | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            # Under autocast the residual stream is carried in the autocast dtype (bf16), as in a bf16 model,
            # while weights, gradients and optimizer state stay fp32. transformers keeps it in fp32 here (its
            # embedding output is fp32): that doubles the activation memory and the elementwise traffic.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # cos/sin in the residual stream's dtype, as transformers does.
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations during backward.
                x = checkpoint(layer, x, cos, sin, attn_mask, segments, shared, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, segments, shared)
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
        state = read_state_dict(model_dir, dtype)
        ours = {}
        for key, tensor in state.items():
            if key.startswith("model."):
                ours[key[len("model."):]] = tensor
            elif key == "lm_head.weight":
                if lm_head and not config.tie_word_embeddings:
                    ours[key] = tensor
            else:
                ours[key] = tensor  # unexpected: load_checked names it
        with torch.device("meta"):  # no memory for random weights we would overwrite anyway
            model = cls(config)
        if "lm_head.weight" in ours:
            with torch.device("meta"):
                model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        load_checked(model, ours, where=str(model_dir))
        return model.to(device)


def is_right_padded(attention_mask) -> bool:
    """True when every row is real tokens followed only by padding (1...1 0...0)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


# ----------------------------------------------------------------------------------------------
# Checkpoint files: locating them (local or Hub cache), reading them, checking every tensor.

WEIGHT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json"]


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not os.path.isabs(name)


def resolve_model_dir(name_or_path: str) -> Path:
    """A local directory as is; a Hub repo id through huggingface_hub (the local cache first, and
    only the config, tokenizer and safetensors files; HF_HUB_OFFLINE=1 never touches the network)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{name_or_path} is a file; pass the checkpoint DIRECTORY that holds config.json")
    if not looks_like_repo_id(name_or_path):
        raise UserError(f"model directory {name_or_path} does not exist; pass an existing directory "
                        "or a Hub repo id such as Qwen/Qwen3-0.6B")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=WEIGHT_FILES))
    except RepositoryNotFoundError:
        raise UserError(f"{name_or_path} is neither a local directory nor a model on the Hugging Face Hub; "
                        "check the spelling (and HF_TOKEN for private repos)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"model {name_or_path} is not in the local Hugging Face cache and the Hub cannot be "
                        "reached (HF_HUB_OFFLINE=1 or no network); download it once with network access, "
                        "or pass a local directory") from None
    except Exception as e:  # network errors and the like: still one line
        raise UserError(f"could not fetch {name_or_path} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                        "check the network or pass a local directory") from None


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None


def read_config(model_dir: Path) -> Qwen3Config:
    d = read_json(model_dir / "config.json", "a checkpoint directory must hold the model's config.json")
    return Qwen3Config.from_hf_dict(d, where=str(model_dir / "config.json"))


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index maps every tensor to its shard
        weight_map = read_json(index, "").get("weight_map", {})
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
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


def read_state_dict(model_dir: Path, dtype=None) -> dict:
    """Every tensor of the checkpoint, cast straight to `dtype` (one copy in memory, never two)."""
    from safetensors import safe_open
    state = {}
    for file in safetensors_files(model_dir):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        state[key] = t.to(dtype)
                    else:  # a fresh, 64-byte aligned copy: safetensors' buffers can be misaligned, and
                        state[key] = t.clone()  # CPU kernels then round differently than for the saved model
        except UserError:
            raise
        except Exception as e:  # header or data unreadable: a truncated download, usually
            raise UserError(f"{file} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            "delete it and download the checkpoint again") from None
    return state


def load_checked(model: nn.Module, state: dict, where: str):
    """Load `state` into `model`, naming every missing, unexpected or mis-shaped tensor in one error.
    Parameters still on the meta device are replaced by the loaded tensors (assign, no copy)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in state and state[k].shape != expected[k]]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label} tensor(s): {shown}")
    if problems:
        raise UserError(f"checkpoint {where} does not fit this model: {'; '.join(problems)}; "
                        "is it a Qwen3 checkpoint of the size its config.json says?")
    model.load_state_dict(state, strict=True, assign=True)
