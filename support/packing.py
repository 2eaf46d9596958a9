"""Batches without padding: packed rows (train.py --packing) and shared prompts (--share_prompt).

- Packing lays a batch's 2B sequences end to end in rows, positions restarting at 0 for each one, so
  no token is padding. Attention must then stay inside each sequence, one of three ways (chosen per
  forward by `choose_impl`, timings in BENCHMARKS.md, `python -m tools.bench --attention`):
  "varlen" (CUDA, bf16/fp16): torch's flash kernel over the flattened sequences, no mask, compiles;
  "loop" (CPU, fp32 on CUDA): causal SDPA on each sequence in turn;
  "mask" (compiled blocks without varlen): a dense block-diagonal causal mask, O(L^2) but traceable.
- Shared prompt: chosen and rejected begin with the same prompt, and under a causal mask its hidden
  states are the same in both, so the model's input holds it once per pair. Projections, MLPs and
  norms (most of the work) see each prompt token once; attention alone copies the prompt's q/k/v into
  both sequences of the "sequence layout" (padded or packed rows), runs there, and each token takes
  its output back from one copy.
- A `Layout` describes all of this for one batch; qwen3.Qwen3.forward takes it as `layout=`, and
  `choose_collate` gives train.py, eval.py and tools/bench.py the collate function for their flags.

The batch types (data.Batch, data.TokenizedPair) and the padded `collate` belong to the lesson's data.py,
which the pair collates import where they run: scoring (rm.py's score, best-of-N) never loads data.py, so
a project with its own `data` module can use the reward model (README, "Use it from another project").
"""
import inspect
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from support.tokenizer import pad_rows

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
# Attention confined to each sequence


def packed_attention_mask(position_ids):
    """Block-diagonal causal mask for packed rows: token i may attend to token j iff both belong to
    the same sequence and j <= i. A new sequence starts wherever the position id drops to 0.
    position_ids (B, T) -> bool mask (B, 1, T, T), True = may attend."""
    doc = (position_ids == 0).cumsum(-1)                                       # (B, T) sequence index
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool,
                        device=position_ids.device).tril()
    return (same_doc & causal)[:, None]


def segments_from_positions(position_ids) -> tuple:
    """cu_seqlens, max_seqlen from positions that restart at 0 for every sequence (a host sync)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten().tolist() + [flat.numel()]
    cu = torch.tensor(starts, dtype=torch.int32, device=position_ids.device)
    return cu, max(b - a for a, b in zip(starts, starts[1:]))


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int):
    """Causal flash attention within each segment. q (N, heads, hd), k/v (N, kv_heads, hd) -> (N, heads, hd)."""
    varlen_attn, params = varlen_kernel()
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch 2.11+ / 2.10
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of its k/v head
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def looped_attention(q, k, v, lengths: list):
    """Causal SDPA on each segment in turn. q (N, heads, hd), k/v (N, kv_heads, hd) -> (N, heads, hd)."""
    out, t = [], 0
    for n in lengths:
        qs, ks, vs = (x[t:t + n].transpose(0, 1)[None] for x in (q, k, v))           # (1, heads, n, hd)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                  enable_gqa=ks.shape[1] != qs.shape[1])[0].transpose(0, 1))
        t += n
    return torch.cat(out, dim=0)


def gather_tokens(x, index):
    """x (B, T, ...) -> (*index.shape, ...): the tokens of x at the flat positions `index` (into B*T)."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[2:])


def choose_impl(model, device, dtype) -> str:
    """Which packed-attention implementation a batch gets: the model's forced choice, else varlen where
    the flash kernel runs, the dense mask inside compiled code, the loop otherwise."""
    if model.packed_attention is not None:
        return model.packed_attention
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and varlen_kernel()[0] is not None:
        return "varlen"
    return "mask" if model.compiled or torch.compiler.is_compiling() else "loop"


class PackedAttention(NamedTuple):
    """How every block attends in one forward of a Layout batch (a NamedTuple: compiled blocks trace it).
    impl "causal": right-padded rows of the sequence layout; "mask": `mask`; "varlen"/"loop": segments."""
    impl: str
    mask: torch.Tensor | None        # (R, 1, L, L) for "mask"
    cu_seqlens: torch.Tensor | None  # (S+1,) int32: segment k is flat tokens [cu[k], cu[k+1])
    max_seqlen: int
    lengths: list | None             # segment lengths on the host, for "loop"
    expand: torch.Tensor | None      # shared prompt: (R, L), the token each sequence position copies
    keep: torch.Tensor | None        # shared prompt: (N,), the sequence position each token reads back

    def attend(self, q, k, v):
        """q (B, heads, T, hd), k/v (B, kv_heads, T, hd) of the model's tokens -> (B, T, heads * hd)."""
        B, H, T, D = q.shape
        if self.expand is not None:  # the prompt's q/k/v copied into both sequences: (R, heads, L, hd)
            q, k, v = (gather_tokens(t.transpose(1, 2), self.expand).transpose(1, 2) for t in (q, k, v))
        R, L = q.shape[0], q.shape[2]
        if self.impl in ("causal", "mask"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None,
                                               enable_gqa=k.shape[1] != H).transpose(1, 2)
        else:  # all rows' tokens end to end, (R*L, heads, hd)
            q, k, v = (t.transpose(1, 2).reshape(R * L, t.shape[1], D) for t in (q, k, v))
            if self.impl == "varlen":
                y = varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen)
            else:
                y = looped_attention(q, k, v, self.lengths)
        y = y.reshape(R * L, H * D)
        if self.keep is not None:  # each token takes its output from one copy (the gradient flows to both)
            y = y.index_select(0, self.keep)
        return y.view(B, T, H * D)


# ----------------------------------------------------------------------------------------------
# The layout of a batch


@dataclass
class Layout:
    """Where a batch's sequences are. The model's tokens are input_ids (R, L) for packed rows, (1, N)
    with shared prompts; the "sequence layout" holds every sequence whole: the packed rows themselves,
    or (shared prompt) the rows that expand_index copies the tokens into."""
    position_ids: torch.Tensor                   # of the model's tokens, restarting at 0 per sequence
    sequence_ids: torch.Tensor                   # (R, L) of the sequence layout: k for sequence k, -1 padding
    num_sequences: int
    cu_seqlens: torch.Tensor | None = None       # segment boundaries of the sequence layout (else read off
    max_seqlen: int | None = None                # sequence_position_ids when needed)
    sequence_position_ids: torch.Tensor | None = None  # (R, L) positions of packed rows; None: right-padded rows
    expand_index: torch.Tensor | None = None     # shared prompt: (R, L) the token each position copies
    keep_index: torch.Tensor | None = None       # shared prompt: (N,) the position each token reads back

    def __post_init__(self):
        if (self.expand_index is None) != (self.keep_index is None):
            raise ValueError("a shared-prompt layout needs expand_index and keep_index together "
                             "(packing.collate_shared / collate_packed(share_prompt=True) give them)")

    @classmethod
    def from_positions(cls, position_ids):
        """Packed rows described by their positions alone (each 0 starts a new sequence)."""
        sequence_ids = ((position_ids == 0).reshape(-1).cumsum(0) - 1).view_as(position_ids)
        return cls(position_ids, sequence_ids, int(sequence_ids.max()) + 1, sequence_position_ids=position_ids)

    def to(self, device) -> "Layout":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, position_ids=move(self.position_ids), sequence_ids=move(self.sequence_ids),
                       cu_seqlens=move(self.cu_seqlens), sequence_position_ids=move(self.sequence_position_ids),
                       expand_index=move(self.expand_index), keep_index=move(self.keep_index))

    def attention(self, model, dtype) -> PackedAttention:
        """What every block of this forward uses to attend (see PackedAttention)."""
        shared = (self.expand_index, self.keep_index)
        positions = self.sequence_position_ids
        if positions is None:  # right-padded rows: plain causal attention needs no mask
            return PackedAttention("causal", None, None, 0, None, *shared)
        impl = choose_impl(model, positions.device, dtype)
        if impl == "mask":
            return PackedAttention("mask", packed_attention_mask(positions), None, 0, None, *shared)
        cu_seqlens, max_seqlen = self.cu_seqlens, self.max_seqlen
        if cu_seqlens is None:
            cu_seqlens, max_seqlen = segments_from_positions(positions)
        cu_seqlens = cu_seqlens.to(positions.device, torch.int32)
        lengths = cu_seqlens.diff().tolist() if impl == "loop" else None
        return PackedAttention(impl, None, cu_seqlens, int(max_seqlen), lengths, *shared)

    def sequence_hidden(self, hidden):
        """The model's hidden states (1, N, H) or (R, L, H) -> the sequence layout (R, L, H), for pooling."""
        return hidden if self.expand_index is None else gather_tokens(hidden, self.expand_index)


# ----------------------------------------------------------------------------------------------
# Collating pairs into a Layout batch


def collate_packed(items: "list[data.TokenizedPair]", pad_id: int, max_tokens: int | None = None,
                   multiple_of: int = 8, *, share_prompt: bool = False) -> "data.Batch":
    """B pairs -> padding-free rows: the 2B sequences laid end to end, chosen ones first (sequence k < B
    is pair k's chosen response, B + k its rejected one, as in data.collate).

    max_tokens None: ONE row holding every token (for varlen attention, whose cost grows with the
    tokens only). max_tokens N: rows of at most N tokens, filled first-fit in decreasing length (for
    the dense mask, whose cost grows with the square of a row's length). Rows are padded to a common
    length, a multiple of `multiple_of`; a row's padding is a dummy segment with its own positions, so
    it attends only to itself. Each sequence and each row's padding is a segment of cu_seqlens.
    share_prompt=True: these rows become the sequence layout, and the model's tokens hold each pair's
    prompt once (see share_prefixes)."""
    import data
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    input_ids, layout, start = pack_rows(seqs, pad_id, max_tokens, multiple_of)
    if share_prompt:
        input_ids, layout = share_prefixes(seqs, pair_groups(len(items)), layout, start, pad_id, multiple_of)
    return data.Batch(input_ids, None, data.batch_margins(items), layout)


def pack_rows(seqs: list[list[int]], pad_id: int, max_tokens: int | None = None,
              multiple_of: int = 8) -> tuple:
    """Sequences -> (input_ids (R, L), their packed Layout, start): start[k] is where sequence k begins in
    the flattened rows (see collate_packed for the rows)."""
    rows = fill_rows([len(s) for s in seqs], max_tokens)
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
    return input_ids, Layout(position_ids, sequence_ids, len(seqs), cu_seqlens, max(segments), position_ids), start


def fill_rows(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Sequence indices per row: first-fit in decreasing length into rows of max_tokens (at least the
    longest sequence), or all in one row; each row's indices sorted, for a stable, readable layout."""
    budget = max(max_tokens, max(lengths)) if max_tokens else sum(lengths)
    rows, room = [], []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[k]), None)
        if r is None:                                          # no row has room: open a new one
            rows.append([])
            room.append(budget)
            r = len(rows) - 1
        rows[r].append(k)
        room[r] -= lengths[k]
    return [sorted(row) for row in rows]


def collate_shared(items: "list[data.TokenizedPair]", pad_id: int) -> "data.Batch":
    """B pairs -> each pair's prompt once in the model's tokens, attention over data.collate's right-padded
    rows (2B, T) as the sequence layout: causal attention there needs no mask, so the plain fused kernel runs."""
    import data
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    input_ids, layout = share_padded(seqs, pair_groups(len(items)), pad_id)
    return data.Batch(input_ids, None, data.batch_margins(items), layout)


def share_padded(seqs: list[list[int]], groups: list[list[int]], pad_id: int) -> tuple:
    """Sequences -> (input_ids (1, n) holding each group's shared prefix once, a Layout whose sequence layout
    is the right-padded rows (N, T) of support.tokenizer.pad_rows)."""
    padded_ids, attention_mask = pad_rows(seqs, pad_id)
    N, T = padded_ids.shape
    rows = torch.arange(N)[:, None].expand(N, T)
    layout = Layout(None, torch.where(attention_mask.bool(), rows, -1), N)
    return share_prefixes(seqs, groups, layout, [k * T for k in range(N)], pad_id, multiple_of=8)


def share_groups(seqs: list[list[int]], groups: list[list[int]], pad_id: int, packed: bool = False) -> tuple:
    """Sequences and the groups of them that share a prompt (lists of indices: a pair, or K responses) ->
    (input_ids, Layout) that run each group's shared prefix once, for RewardModel(input_ids, layout=...).
    The shared part is a group's longest common prefix, so the ids are exactly the whole texts' ids: a token
    merged across the prompt/response boundary simply belongs to the responses. Sequence layout:
    right-padded rows (N, T), or packed (one row)."""
    if not packed:
        return share_padded(seqs, groups, pad_id)
    input_ids, layout, start = pack_rows(seqs, pad_id)
    return share_prefixes(seqs, groups, layout, start, pad_id, multiple_of=8)


def collate_responses(seqs: list[list[int]], pad_id: int, packed: bool = False) -> tuple:
    """N sequences of one prompt and N responses (best-of-N): share_groups with one group."""
    return share_groups(seqs, [list(range(len(seqs)))], pad_id, packed)


def pair_groups(B: int) -> list[list[int]]:
    """The sequences that share a prompt in a batch of B pairs: chosen k and rejected B + k."""
    return [[k, B + k] for k in range(B)]


def shared_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences have in common (the prompt, at least)."""
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def share_prefixes(seqs: list[list[int]], groups: list[list[int]], layout: Layout, start: list[int],
                   pad_id: int, multiple_of: int) -> tuple:
    """The sequence layout of a batch -> (input_ids (1, n) holding each group's shared prefix once, the
    shared-prompt Layout). groups: lists of sequence indices that begin with the same prompt (a pair, or N
    responses); the prefix shared is their longest common one. start[k]: where sequence k begins in the
    flattened sequence layout.

    Example, one group: chosen [p q a], rejected [p q b c] (prompt p q), sequence layout one packed row
    [p q a | p q b c]. Tokens: [p q a b c], positions [0 1 2 2 3]. expand_index = [0 1 2 0 1 3 4] (the
    token each position of the sequence layout copies), keep_index = [0 1 2 5 6] (the position of the
    sequence layout whose attention output each token takes: the prompt from the first sequence's copy).
    A group of N: the first sequence whole, then each other one's tail after the shared prefix."""
    ids, positions, keep = [], [], []
    token_of = [None] * len(seqs)          # token_of[k][j]: the token that is sequence k's j-th
    for group in groups:
        first, rest = group[0], group[1:]
        n_shared = min((shared_prefix_len(seqs[first], seqs[k]) for k in rest), default=len(seqs[first]))
        offset = len(ids)                                                      # this group's first token
        ids += seqs[first]
        positions += list(range(len(seqs[first])))
        token_of[first] = list(range(offset, offset + len(seqs[first])))
        keep += [start[first] + j for j in range(len(seqs[first]))]
        for k in rest:                                                         # each tail after the prefix
            tail = len(ids)
            ids += seqs[k][n_shared:]
            positions += list(range(n_shared, len(seqs[k])))
            token_of[k] = list(range(offset, offset + n_shared)) + list(range(tail, len(ids)))
            keep += [start[k] + j for j in range(n_shared, len(seqs[k]))]
    n = len(ids)
    padded = -(-n // multiple_of) * multiple_of
    input_ids = torch.full((1, padded), pad_id, dtype=torch.long)
    input_ids[0, :n] = torch.tensor(ids, dtype=torch.long)
    position_ids = torch.zeros((1, padded), dtype=torch.long)
    position_ids[0, :n] = torch.tensor(positions, dtype=torch.long)
    position_ids[0, n:] = torch.arange(padded - n)
    # Padding, in either layout, copies / reads position 0: its values never reach a reward.
    expand_index = torch.zeros(layout.sequence_ids.numel(), dtype=torch.long)
    for k, tokens in enumerate(token_of):
        expand_index[start[k]:start[k] + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    keep_index = torch.zeros(padded, dtype=torch.long)
    keep_index[:n] = torch.tensor(keep, dtype=torch.long)
    return input_ids, replace(layout, position_ids=position_ids, expand_index=expand_index.view_as(layout.sequence_ids),
                              keep_index=keep_index)


def choose_collate(packing: bool, share_prompt: bool):
    """The collate function `(items, pad_id) -> Batch` for train.py's / eval.py's / tools/bench.py's flags."""
    import data
    if packing:
        return partial(collate_packed, share_prompt=share_prompt)
    return collate_shared if share_prompt else data.collate
