"""The reward model: a Qwen3 backbone, a pooling step and a small head that outputs one number.

    hidden = Qwen3(input_ids)                 # (N, T, hidden)  final-normed hidden states, no LM head
    pooled = pool(hidden)                     # (N, hidden)     mean over real tokens, or the last real token
    reward = head(pooled)                     # (N,)            "how good is this response?"

Why pairs: people compare two answers more reliably than they score one, so the data are pairs, a
`chosen` response preferred to a `rejected` one for the same prompt. The Bradley-Terry model (Bradley &
Terry 1952; InstructGPT's reward loss, Ouyang et al. 2022) makes two rewards a probability,
P(chosen preferred) = sigmoid(r_chosen - r_rejected); `pairwise_loss` is its negative log-likelihood (an
untrained model, all rewards near 0, starts at log 2 = 0.693). Only differences enter, so rewards are
defined up to a constant: the head has no output bias (it would cancel), and centering pins the free
constant near 0 so rewards compare across runs. A margin r_chosen - r_rejected as a probability:
sigmoid(0.5) = 0.62, sigmoid(1) = 0.73, sigmoid(2) = 0.88, sigmoid(3) = 0.95. A batch of B pairs runs as
2B rows, chosen then rejected, in one forward pass (why: data.collate).

- Heads: `mlp` (default; hidden -> hidden/2 -> 1, GELU, mean pooling) or `linear` (a bias-free `score`
  layer with last-token pooling: transformers' Qwen3ForSequenceClassification, so it loads there as is).
  Any other combination is saved with a model_type that transformers refuses to load, rather than
  loading as a classifier with a random `score` layer (support/export.py: the format on disk).
- Pooling follows the attention mask (or a packing.Layout's sequence ids), never a search for the pad
  token: pad and eos can be the same token. The head runs on the pooled vectors only.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import export, scoring
from support.errors import UserError
from qwen3 import Qwen3, Qwen3Config

HEADS, POOLINGS = export.HEADS, export.POOLINGS  # ("mlp", "linear"), ("mean", "last"): names config.json keeps


def pool_padded(hidden, attention_mask, how: str):
    """The simple case, one sequence per right-padded row: hidden (N, T, H), attention_mask (N, T) ->
    (N, H) fp32, the mean over real tokens or the last real token. `pool` computes the same, generalised."""
    mask = attention_mask[..., None].float()                                # (N, T, 1), 1 = real token
    if how == "mean":
        return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    if how == "last":
        lengths = attention_mask.sum(1)                                     # (N,) real tokens per row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1].float()
    raise ValueError(f"unknown pooling {how!r}")


def pool(hidden, sequence_ids, num_sequences: int, how: str):
    """`pool_padded` for any layout: hidden (R, L, H); sequence_ids (R, L) the sequence of each token, -1
    on padding (padded: row i is sequence i; packed: several per row) -> (num_sequences, H) fp32. Static
    shapes, so it compiles: one bucket per sequence sums (mean) or keeps the highest position (last), and
    padding goes into an extra bucket that we drop."""
    H = hidden.shape[-1]
    flat = hidden.reshape(-1, H).float()
    ids = sequence_ids.reshape(-1)
    bucket = torch.where(ids >= 0, ids, num_sequences)                    # padding -> bucket N
    if how == "mean":
        sums = flat.new_zeros(num_sequences + 1, H).index_add_(0, bucket, flat)
        # index_add_, not bincount: on CUDA bincount reads its max back to the host, a sync mid-step
        counts = flat.new_zeros(num_sequences + 1).index_add_(0, bucket, flat.new_ones(ids.numel())).clamp(min=1)
        return (sums / counts[:, None])[:num_sequences]
    if how == "last":
        position = torch.arange(ids.numel(), device=ids.device)
        last = torch.full((num_sequences + 1,), -1, device=ids.device, dtype=torch.long)
        last = last.scatter_reduce(0, bucket, position, reduce="amax")[:num_sequences]
        return flat[last.clamp(min=0)]
    raise ValueError(f"unknown pooling {how!r}")


def padded_sequence_ids(input_ids, attention_mask=None):
    """Sequence ids of padded rows for `pool`: row i is sequence i, -1 on padding."""
    N = input_ids.shape[0]
    rows = torch.arange(N, device=input_ids.device)[:, None].expand_as(input_ids)
    return rows if attention_mask is None else torch.where(attention_mask.bool(), rows, -1)


def pairwise_loss(chosen, rejected, margin=None, center_rewards_coefficient: float = 0.0) -> dict:
    """Bradley-Terry loss of a batch of pairs, plus the numbers worth logging.

    chosen, rejected (B,) rewards; margin (B,) optional: how much better chosen must be (e.g. from
    graded preferences); center_rewards_coefficient * mean((r_c + r_r)^2) pulls rewards toward 0.
    """
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - margin if margin is not None else diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return {"loss": loss, "accuracy": (diff > 0).float().mean(), "margin": diff.mean()}


def group_pairs(rewards, group, level) -> tuple:
    """(N, N) r_i - r_j; whether i beats j (same group, higher level); accuracy and margin over those pairs."""
    beats = (group[:, None] == group[None, :]) & (level[:, None] > level[None, :])
    diff, n = rewards[:, None] - rewards[None, :], beats.sum().clamp(min=1)
    return diff, beats, {"accuracy": ((diff > 0) & beats).sum() / n, "margin": (diff.detach() * beats).sum() / n}


def listwise_loss(rewards, group, level, num_groups: int) -> dict:
    """Plackett-Luce: -log P(ranking), each response picked by softmax over those not yet picked, best first. K = 2:
    exp(r_c) / (exp(r_c) + exp(r_r)) = sigmoid(r_c - r_r): Bradley-Terry IS Plackett-Luce. Ties (Breslow): a response
    that beats another is picked from itself, its ties and all below; the lowest level is not. Mean over groups."""
    _, beats, logged = group_pairs(rewards, group, level)
    left = (group[:, None] == group[None, :]) & (level[None, :] <= level[:, None])   # (N, N): i's choice set
    log_p = rewards - torch.logsumexp(rewards.expand(len(rewards), -1).masked_fill(~left, -math.inf), dim=1)
    return {"loss": -torch.where(beats.any(1), log_p, 0.0).sum() / num_groups, **logged}


def all_pairs_loss(rewards, group, level, num_groups: int) -> dict:
    """InstructGPT: pairwise_loss averaged over every pair (i beats j) of a group, each response scored once."""
    diff, beats, logged = group_pairs(rewards, group, level)
    pairs = rewards.new_zeros(num_groups).index_add_(0, group, beats.sum(1).to(rewards.dtype))[group]  # (N,)
    return {"loss": -(F.logsigmoid(diff) * beats / pairs[:, None].clamp(min=1)).sum() / num_groups, **logged}


class MLPHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden // 2)
        # No output bias: it cancels in r_chosen - r_rejected, so its gradient is rounding noise Adam amplifies.
        self.fc2 = nn.Linear(hidden // 2, 1, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RewardModel(nn.Module):
    # Module names follow the transformers layout: `model.*` for the backbone, then one `head`.
    config_class = Qwen3Config  # what from_pretrained builds from config.json

    def __init__(self, config: Qwen3Config, head: str = "mlp", pooling: str = "mean"):
        super().__init__()
        if head not in HEADS:
            raise UserError(f"unknown head {head!r}; choose one of {HEADS}")
        if pooling not in POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.config, self.head_type, self.pooling = config, head, pooling
        self.model = Qwen3(config)
        self.head = MLPHead(config.hidden_size) if head == "mlp" else nn.Linear(config.hidden_size, 1, bias=False)
        self.tokenizer = None           # a support.tokenizer.Tokenizer, set by from_pretrained when the checkpoint has one
        self.provenance = {}            # how it was trained, and reward statistics: saved in config.json

    def init_head(self, seed: int = 0):
        """Small random init of the output layer, so initial rewards are near 0 (about +-0.01 to 0.02)."""
        gen = torch.Generator().manual_seed(seed)
        out = self.head.fc2 if self.head_type == "mlp" else self.head
        with torch.no_grad():
            if self.head_type == "mlp":
                fc1 = self.head.fc1
                bound = 1 / math.sqrt(fc1.in_features)  # nn.Linear's default, seeded
                fc1.weight.copy_(torch.empty(fc1.weight.shape).uniform_(-bound, bound, generator=gen))
                fc1.bias.zero_()
            out.weight.copy_(torch.empty(out.weight.shape).normal_(0, 0.02 / math.sqrt(out.in_features), generator=gen))
        return self

    def forward(self, input_ids, attention_mask=None, layout=None):
        """Rewards (N,) fp32, one per sequence: of padded rows, input_ids/attention_mask (N, T), or of the
        sequences a packing.Layout places (packed, or shared prompts: a prompt token counts in both means)."""
        hidden = self.model(input_ids, attention_mask, layout)
        if layout is None:
            sequence_ids, num_sequences = padded_sequence_ids(input_ids, attention_mask), input_ids.shape[0]
        else:
            hidden, sequence_ids, num_sequences = layout.sequence_hidden(hidden), layout.sequence_ids, layout.num_sequences
        # (N, 1) -> (N,) by a sum over the single column: a new tensor rather than a view, because FSDP2
        # warns about module outputs that are views (an in-place op on them would skip its hooks).
        return self.head(pool(hidden, sequence_ids, num_sequences, self.pooling)).sum(-1).float()

    @torch.no_grad()
    def score(self, texts: list, batch_size: int = 8, max_length: int | None = None,
              normalize: bool = False) -> list[float]:
        """Rewards, in input order, for whole transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") or
        conversations (lists of {"role", "content"} messages, rendered with the model's chat template).

        The ids are those training sees (Tokenizer.sequence: eos appended to a text unless it ends with it,
        nothing to a conversation); longer than max_length (default: the training max_length saved with the
        model, else max_position_embeddings: scoring.scoring_length, one rule on every scoring path) keeps
        the END, as training does. Batches are formed by length. normalize: (r - mean) / std, reward_stats.
        """
        scoring.check_arguments("score", "texts", texts, batch_size, max_length, normalize)  # a str is not a list
        seqs = scoring.sequences(self, texts, max_length)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        return scoring.run_batches(self, seqs, batches, normalize)

    @torch.no_grad()
    def score_responses(self, prompt, responses: list, normalize: bool = False, max_length: int | None = None,
                        batch_size: int = 16) -> list[float]:
        """One reward per response to the same prompt (best-of-N), equal to score() of each whole text
        (scoring.joined: prompt + response, or a conversation plus the assistant's turn), with the prompt's
        tokens run once per batch_size responses (packing.collate_responses)."""
        scoring.check_arguments("score_responses", "responses", responses, batch_size, max_length, normalize)
        seqs = scoring.sequences(self, scoring.joined(prompt, responses), max_length)
        batches = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
        return scoring.run_batches(self, seqs, batches, normalize, shared=True)

    def reward_function(self, normalize: bool = False):
        """f(prompts, completions, **kwargs) -> rewards: TRL GRPOTrainer's reward_funcs (scoring.reward_function)."""
        return scoring.reward_function(self, normalize)

    @property
    def reward_stats(self) -> dict | None:
        """{"mean", "std", "n"} of held-out rewards saved with the model (for normalize=True), or None."""
        return self.provenance.get("reward_stats")

    # ---- memory options ----------------------------------------------------------------------

    def freeze_layers(self, n: int):
        """Freeze the embeddings and the first n blocks: no gradients, so no optimizer state either."""
        if not 0 <= n <= self.config.num_hidden_layers:
            raise UserError(f"--freeze_layers {n} is out of range: the model has "
                            f"{self.config.num_hidden_layers} layers; use 0 to {self.config.num_hidden_layers}")
        if n > 0:
            self.model.embed_tokens.requires_grad_(False)
            for layer in self.model.layers[:n]:
                layer.requires_grad_(False)
        return self

    def quantize_8bit(self, threshold: float = 6.0):
        """Replace every backbone linear layer with a frozen int8 bitsandbytes Linear8bitLt (LLM.int8():
        outlier features above `threshold` stay in 16-bit). Only the head and the norms keep training;
        the embeddings are frozen too."""
        export.quantize_linears_8bit(self.model, threshold)
        self.model.embed_tokens.requires_grad_(False)
        return self

    # ---- save / load -------------------------------------------------------------------------

    def save_pretrained(self, out_dir, extra_files: dict | None = None):
        """model.safetensors, config.json and the tokenizer files, written whole or not at all; transformers
        loads the linear head with last-token pooling as a Qwen3ForSequenceClassification (support/export.py)."""
        return export.save(self, out_dir, extra_files)

    @classmethod
    def from_pretrained(cls, name_or_path: str, head: str | None = None, pooling: str | None = None,
                        dtype=torch.float32, device="cpu", seed: int = 0) -> "RewardModel":
        """Load one of three kinds of checkpoint (a local directory or a Hub repo id):
        - a reward model saved by us (config.json has a "reward_model" entry);
        - a transformers Qwen3ForSequenceClassification (published Qwen3 reward models): head linear, pooling last;
        - a plain Qwen3 causal LM (e.g. Qwen/Qwen3-0.6B): the backbone, plus a freshly initialised head.
        """
        return export.load(cls, name_or_path, head, pooling, dtype, device, seed)
