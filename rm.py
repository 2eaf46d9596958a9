"""The reward model: a Qwen3 backbone, a pooling step and a small head that outputs one number.

    hidden = Qwen3(input_ids)                 # (N, T, hidden)  final-normed hidden states, no LM head
    pooled = pool(hidden)                     # (N, hidden)     mean over real tokens, or the last real token
    reward = head(pooled)                     # (N,)            "how good is this response?"

Training data are pairs: for one prompt, a `chosen` response people preferred and a `rejected` one.
Chosen and rejected run through the backbone together, in ONE forward pass (rows 0..B-1 chosen, B..2B-1
rejected, see data.collate). The Bradley-Terry model says P(chosen preferred) = sigmoid(r_chosen -
r_rejected), so `pairwise_loss` minimises -log sigmoid(r_chosen - r_rejected - margin).

- Heads: `mlp` (default; hidden -> hidden/2 -> 1, GELU, mean pooling) or `linear` (a bias-free `score`
  layer with last-token pooling: transformers' Qwen3ForSequenceClassification, so it loads there as is).
  Any other combination is saved with model_type REWARD_MODEL_TYPE, which transformers refuses to load,
  rather than loading as a classifier with a random `score` layer.
- Pooling follows the attention mask (or a packing.Layout's sequence ids), never a search for the pad
  token: pad and eos can be the same token. The head runs on the pooled vectors only.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.tokenizer import Tokenizer
from support.errors import UserError
from support.fileio import atomic_dir, write_json
from support.hub import read_json, resolve_model_dir
from support import packing, scoring
from support.lora import merged_state_dict
from qwen3 import Qwen3, Qwen3Config, load_weights, read_header

HEADS = ("mlp", "linear")
POOLINGS = ("mean", "last")
REWARD_MODEL_TYPE = "qwen3_reward_model"  # a model_type transformers does not know: it refuses the directory


def pool(hidden, sequence_ids, num_sequences: int, how: str):
    """Pool token states into one vector per sequence.

    hidden (R, L, H); sequence_ids (R, L): which sequence each token belongs to, -1 for padding.
    A padded batch has sequence_ids[i, t] = i on real tokens; a packed batch holds several sequences
    per row. Returns (num_sequences, H) in fp32. Shapes stay static (no boolean indexing), so this
    compiles: padding goes into an extra bucket that we drop.
    """
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


def pairwise_loss(chosen, rejected, margin=None, center_rewards_coefficient: float = 0.0) -> dict:
    """Bradley-Terry loss of a batch of pairs, plus the numbers worth logging.

    chosen, rejected (B,) rewards; margin (B,) optional: how much better chosen must be (e.g. from
    graded preferences); centering pulls the mean reward to 0 so rewards stay comparable across runs.
    """
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - margin if margin is not None else diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return {"loss": loss, "accuracy": (diff > 0).float().mean(), "margin": diff.mean()}


class MLPHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden // 2)
        # No output bias: the pairwise loss only sees r_chosen - r_rejected, so a bias would cancel and
        # its gradient would be pure rounding noise (which Adam would happily amplify into drift).
        self.fc2 = nn.Linear(hidden // 2, 1, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def padded_sequence_ids(input_ids, attention_mask=None):
    """Sequence ids of padded rows for `pool`: row i is sequence i, -1 on padding."""
    N = input_ids.shape[0]
    rows = torch.arange(N, device=input_ids.device)[:, None].expand_as(input_ids)
    return rows if attention_mask is None else torch.where(attention_mask.bool(), rows, -1)


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


def names(value) -> bool:
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


# What a saved "reward_model" entry records of the training that eval.py reads back: the check each value
# must pass (None is always fine: not recorded).
SAVED_SETTINGS = {"max_length": ("a whole number >= 2", lambda v: type(v) is int and v >= 2),
                  "share_prompt": ("true or false", lambda v: type(v) is bool),
                  "dataset": ("a name or a list of names", names),
                  "eval_dataset": ("a name or a list of names", names),
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


class RewardModel(nn.Module):
    # Module names follow the transformers layout: `model.*` for the backbone, then one `head`.
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
        """Small random init of the output layer, so initial rewards are near 0 (about +-0.02)."""
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
        """Rewards (N,) fp32, one per sequence.

        Padded batch: input_ids/attention_mask (N, T), right padded. Packed or shared-prompt batch: a
        packing.Layout says where the sequences are; the hidden states are read in its sequence layout,
        so a shared prompt token counts in both sequences' mean.
        """
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
        """Rewards, in input order, for whole transcripts ("\n\nHuman: ...\n\nAssistant: ...") or
        conversations (lists of {"role", "content"} messages, rendered with the model's chat template).

        The ids are those training sees (Tokenizer.sequence: a text gets the eos token appended unless it
        ends with it, a conversation nothing); longer than max_length (default: the model's
        max_position_embeddings) keeps the END (the response), as training does. Batches are formed by
        length to waste little padding. normalize: (r - mean) / std with the saved reward_stats.
        """
        seqs = scoring.sequences(self, texts, max_length)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        return scoring.run_batches(self, seqs, [order[i:i + batch_size] for i in range(0, len(order), batch_size)],
                                   normalize)

    @torch.no_grad()
    def score_responses(self, prompt, responses: list, normalize: bool = False, max_length: int | None = None,
                        batch_size: int = 16) -> list[float]:
        """One reward per response to the same prompt (best-of-N), equal to score() of each whole text
        (scoring.joined: prompt + response, or a conversation plus the assistant's turn), with the prompt's
        tokens run once per batch_size responses (packing.collate_responses)."""
        seqs = scoring.sequences(self, scoring.joined(prompt, responses), max_length)
        order = list(range(len(seqs)))
        return scoring.run_batches(self, seqs, [order[i:i + batch_size] for i in range(0, len(order), batch_size)],
                                   normalize, shared=True)

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
        quantize_linears_8bit(self.model, threshold)
        self.model.embed_tokens.requires_grad_(False)
        return self

    # ---- save / load -------------------------------------------------------------------------

    def hf_config(self) -> dict:
        cfg = self.config.to_hf_dict()
        tok = self.tokenizer
        if (self.head_type, self.pooling) == ("linear", "last"):
            # transformers' Qwen3ForSequenceClassification reads these; it pools the last token that is
            # not pad_token_id, which is our last token: we never append an eos equal to pad (eos_suffix).
            cfg.update(architectures=["Qwen3ForSequenceClassification"], id2label={"0": "LABEL_0"},
                       label2id={"LABEL_0": 0})
        else:  # transformers has no such head: refuse to load there, rather than load a random `score` layer
            cfg.update(model_type=REWARD_MODEL_TYPE, architectures=["Qwen3RewardModel"])
        cfg.update(pad_token_id=tok.pad_id if tok else None, eos_token_id=tok.eos_id if tok else None,
                   bos_token_id=tok.bos_id if tok else None,
                   torch_dtype=str(self.model.norm.weight.dtype).replace("torch.", ""),
                   reward_model={"head": self.head_type, "pooling": self.pooling, **self.provenance},
                   **scoring.config_keys(self.reward_stats))  # OpenRLHF's names for them
        return cfg

    def export_state_dict(self) -> dict:
        """The state dict in plain tensors under the checkpoint key names, loadable without this code:
        int8 layers are dequantised back to ordinary weights (with the small int8 rounding baked in) and
        LoRA adapters merged into the weights they adapt, W + (alpha/r) B A (lora.merged_state_dict)."""
        merged = merged_state_dict(self, dtype=self.model.norm.weight.dtype)
        return {disk_name(n): t.detach().contiguous() for n, t in merged.items()}

    def save_pretrained(self, out_dir, extra_files: dict | None = None):
        """Write model.safetensors, config.json and the tokenizer files into a temporary sibling directory
        that is renamed into place only when complete (fileio.atomic_dir)."""
        from safetensors.torch import save_file
        with atomic_dir(out_dir) as tmp:
            save_file(self.export_state_dict(), tmp / "model.safetensors", metadata={"format": "pt"})
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
            for name, write in (extra_files or {}).items():
                write(tmp / name)
            write_json(tmp / "config.json", self.hf_config())  # last: marks the directory complete
        return Path(out_dir)

    @classmethod
    def from_pretrained(cls, name_or_path: str, head: str | None = None, pooling: str | None = None,
                        dtype=torch.float32, device="cpu", seed: int = 0) -> "RewardModel":
        """Load one of three kinds of checkpoint (a local directory or a Hub repo id):
        - a reward model saved by us (config.json has a "reward_model" entry);
        - a transformers Qwen3ForSequenceClassification (published Qwen3 reward models): head linear, pooling last;
        - a plain Qwen3 causal LM (e.g. Qwen/Qwen3-0.6B): the backbone, plus a freshly initialised head.
        """
        model_dir = resolve_model_dir(name_or_path)
        raw = read_json(model_dir / "config.json", "a checkpoint directory must hold the model's config.json")
        saved = reward_model_config(raw, model_dir)
        backbone = {**raw, "model_type": "qwen3"} if saved and raw.get("model_type") == REWARD_MODEL_TYPE else raw
        config = Qwen3Config.from_hf_dict(backbone, where=str(model_dir / "config.json"))
        if saved is not None:
            for what, asked in (("head", head), ("pooling", pooling)):
                if asked is not None and asked != saved[what]:
                    raise UserError(f"{model_dir} was saved with {what} {saved[what]!r}; it cannot be loaded "
                                    f"with {what} {asked!r} (drop the option)")
            head, pooling = saved["head"], saved["pooling"]
        header = read_header(model_dir, config)  # weights that disagree with config.json: refused, nothing built
        with torch.device("meta"):
            model = cls(config, head=head or "mlp", pooling=pooling or "mean")
        fresh = set()
        if saved is None:  # a plain language model: a fresh head
            model.head.to_empty(device="cpu")
            model.init_head(seed)
            fresh = {name for name in model.state_dict() if name.startswith("head.")}
        # a reward model never uses the LM head
        load_weights(model, model_dir, dtype, lambda key: None if key == "lm_head.weight" else module_name(key),
                     keep=fresh, header=header)
        model.to(dtype=dtype)
        if saved is not None:
            model.provenance = {k: v for k, v in saved.items() if k not in ("head", "pooling")}
        if (model_dir / "tokenizer.json").is_file():
            model.tokenizer = Tokenizer.from_dir(model_dir)
            if model.tokenizer.vocab_size > config.vocab_size:  # its ids would index past the embeddings
                raise UserError(f"{model_dir}/tokenizer.json has {model.tokenizer.vocab_size} tokens but the model's "
                                f"vocab_size is {config.vocab_size}: the tokenizer belongs to another model; "
                                "copy the base model's tokenizer files there")
        return model.to(device)


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
