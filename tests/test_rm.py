"""rm.py: pooling, the pairwise loss, save/load, transformers interop, memory options."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import save_hf_model
from support.errors import UserError
from qwen3 import SHAPES, Qwen3
from rm import RewardModel, pairwise_loss, padded_sequence_ids, pool, pool_padded
from support.export import reward_model_config


def tiny_rm(head="mlp", pooling="mean", seed=0):
    torch.manual_seed(seed)
    m = RewardModel(SHAPES["tiny"], head=head, pooling=pooling)
    m.model.init_weights(seed=seed)
    return m.init_head(seed).eval()


def right_pad(seqs, pad_id=0):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_reward_independent_of_padding_and_batchmates(head, pooling):
    model = tiny_rm(head, pooling)
    g = torch.Generator().manual_seed(0)
    target = torch.randint(1, 512, (6,), generator=g).tolist()
    alone = model(torch.tensor([target]))[0]
    others = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 14, 9)]
    for batch in ([target] + others, others + [target], [others[1], target]):
        ids, mask = right_pad(batch, pad_id=7)
        r = model(ids, attention_mask=mask)
        assert r.dtype == torch.float32 and r.shape == (len(batch),)
        assert abs(r[batch.index(target)] - alone) < 1e-5


def test_pooling_by_hand():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.where(mask.bool(), torch.arange(2)[:, None], -1)
    assert torch.equal(pool(h, ids, 2, "mean"), torch.stack([h[0, :3].mean(0), h[1, :2].mean(0)]))
    assert torch.equal(pool(h, ids, 2, "last"), torch.stack([h[0, 2], h[1, 1]]))
    # packed: one row holding sequence 0 (3 tokens) then sequence 1 (1 token)
    packed = torch.tensor([[0, 0, 0, 1]])
    assert torch.equal(pool(h[:1], packed, 2, "last"), torch.stack([h[0, 2], h[0, 3]]))


@pytest.mark.parametrize("how", ["mean", "last"])
def test_padded_pooling_is_the_general_pooling_on_padded_rows(how):
    """rm.pool_padded (masked mean, hidden[arange, lengths - 1]) is what rm.pool computes on padded rows."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 9, 16, generator=g)
    _, mask = right_pad([[1] * n for n in (9, 1, 4, 7, 2)])
    simple, general = pool_padded(hidden, mask, how), pool(hidden, padded_sequence_ids(hidden[..., 0], mask), 5, how)
    assert simple.dtype == general.dtype == torch.float32 and simple.shape == general.shape == (5, 16)
    torch.testing.assert_close(simple, general, rtol=0, atol=1e-6)
    by_hand = [hidden[i, :n].mean(0) if how == "mean" else hidden[i, n - 1] for i, n in enumerate((9, 1, 4, 7, 2))]
    torch.testing.assert_close(simple, torch.stack(by_hand), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_padded(hidden, mask, "max")


def test_loss_matches_hand_computation():
    c, r = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    m = torch.tensor([0.5, 0.0, 1.0])
    def nls(x):  # -log(sigmoid(x)) written out
        return math.log(1 + math.exp(-x))
    out = pairwise_loss(c, r)
    assert abs(out["loss"] - (nls(1.0) + nls(-1.0) + nls(-0.5)) / 3) < 1e-6
    assert abs(out["accuracy"] - 1 / 3) < 1e-7 and abs(out["margin"] - (1 - 1 - 0.5) / 3) < 1e-7
    out = pairwise_loss(c, r, margin=m)
    assert abs(out["loss"] - (nls(0.5) + nls(-1.0) + nls(-1.5)) / 3) < 1e-6
    out = pairwise_loss(c, r, margin=m, center_rewards_coefficient=0.01)
    center = 0.01 * ((1.0 ** 2) + 0 ** 2 + 4.5 ** 2) / 3
    assert abs(out["loss"] - ((nls(0.5) + nls(-1.0) + nls(-1.5)) / 3 + center)) < 1e-6


def test_pair_forward_is_one_pass_with_loss():
    model = tiny_rm()
    ids, mask = right_pad([[5, 6, 7], [8, 9], [5, 6, 1, 2], [8, 3]])  # 2 chosen then 2 rejected
    r = model(ids, attention_mask=mask)
    out = pairwise_loss(*r.chunk(2), margin=torch.tensor([0.1, 0.2]))
    want = -F.logsigmoid(r[:2] - r[2:] - torch.tensor([0.1, 0.2])).mean()
    assert torch.allclose(out["loss"], want)
    out["loss"].backward()
    assert model.head.fc2.weight.grad is not None


def test_roundtrip_exact(tmp_path, demo_tok):
    for head, pooling in (("mlp", "mean"), ("linear", "last")):
        model = tiny_rm(head, pooling)
        model.tokenizer = demo_tok
        model.provenance = {"reward_mean": 0.5, "max_length": 64}
        model.save_pretrained(tmp_path / head)
        loaded = RewardModel.from_pretrained(str(tmp_path / head)).eval()
        assert (loaded.head_type, loaded.pooling) == (head, pooling)
        assert loaded.provenance == {"reward_mean": 0.5, "max_length": 64}
        ids, mask = right_pad([[5, 6, 7, 9], [8, 9]])
        assert torch.equal(model(ids, mask), loaded(ids, mask))
        texts = ["\n\nHuman: hello\n\nAssistant: hi there", "\n\nHuman: a\n\nAssistant: b"]
        assert loaded.score(texts) == model.score(texts)


def test_score_matches_forward_and_keeps_order(demo_tok):
    model = tiny_rm()
    model.tokenizer = demo_tok
    texts = ["\n\nHuman: hello there friend\n\nAssistant: hi", "\n\nHuman: a\n\nAssistant: b", "x y"]
    got = model.score(texts, batch_size=2)
    for t, r in zip(texts, got):
        ids = torch.tensor([demo_tok.encode(t) + [demo_tok.eos_id]])
        assert abs(model(ids).item() - r) < 1e-5


def test_loads_transformers_sequence_classifier(tmp_path):
    hf = save_hf_model(tmp_path, cls_name="Qwen3ForSequenceClassification", num_labels=1, pad_token_id=0)
    ours = RewardModel.from_pretrained(str(tmp_path))
    assert (ours.head_type, ours.pooling) == ("linear", "last")
    ids, mask = right_pad([[5, 6, 7, 9, 11], [8, 9], [3, 4, 5]], pad_id=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (ours(ids, attention_mask=mask) - want).abs().max() < 1e-5


def test_our_linear_save_loads_in_transformers(tmp_path, demo_tok):
    from transformers import AutoModelForSequenceClassification
    model = tiny_rm("linear", "last")
    model.tokenizer = demo_tok
    model.save_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.pad_token_id == demo_tok.pad_id
    ids, mask = right_pad([[5, 6, 7, 9, 11], [8, 9], [3, 4, 5]], pad_id=demo_tok.pad_id)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (model(ids, attention_mask=mask) - want).abs().max() < 1e-4


def test_causal_lm_gets_backbone_and_fresh_small_head(tmp_path):
    save_hf_model(tmp_path, tie_word_embeddings=False)  # has an lm_head.weight we must ignore
    model = RewardModel.from_pretrained(str(tmp_path))
    backbone = Qwen3.from_pretrained(str(tmp_path))
    for (n, p), (n2, p2) in zip(model.model.state_dict().items(), backbone.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    ids = torch.randint(1, 320, (8, 12))
    r = model(ids)
    assert r.abs().max() < 0.2 and r.std() > 0  # near 0, yet not degenerate
    lin = RewardModel.from_pretrained(str(tmp_path), head="linear", pooling="last")
    assert lin.head.weight.shape == (1, 48)


def test_head_conflict_is_a_clear_error(tmp_path):
    tiny_rm("mlp").save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match="saved with head 'mlp'"):
        RewardModel.from_pretrained(str(tmp_path / "rm"), head="linear")


def test_crash_mid_save_leaves_old_model_or_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    model = tiny_rm()
    model.save_pretrained(tmp_path / "rm")
    before = RewardModel.from_pretrained(str(tmp_path / "rm"))
    def boom(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        tiny_rm(seed=1).save_pretrained(tmp_path / "rm")
    with pytest.raises(OSError):
        tiny_rm(seed=1).save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no temp leftovers, no half "new"
    after = RewardModel.from_pretrained(str(tmp_path / "rm"))
    ids = torch.randint(1, 512, (2, 5))
    assert torch.equal(before(ids), after(ids))


def test_freeze_layers_freezes_exactly():
    model = tiny_rm().freeze_layers(1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    want = {n for n, _ in model.named_parameters() if n.startswith(("model.embed_tokens", "model.layers.0."))}
    assert frozen == want
    with pytest.raises(UserError, match="out of range"):
        tiny_rm().freeze_layers(3)


def test_8bit_model_trains_only_head_and_norms(tmp_path):
    import bitsandbytes as bnb
    model = tiny_rm().quantize_8bit().train()
    linears = [m for m in model.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 2 * 7 and all(m.weight.dtype == torch.int8 for m in linears)
    ids, mask = right_pad([[5, 6, 7], [8, 9], [5, 6, 1, 2], [8, 3]])
    with torch.no_grad():
        ref = tiny_rm()(ids, attention_mask=mask)
    rewards = model(ids, attention_mask=mask)
    assert (rewards - ref).abs().max() < 0.05  # int8 rounding only
    pairwise_loss(*rewards.chunk(2))["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("norm" in n or n.startswith("head.") for n in with_grad)
    assert any(n.startswith("head.") for n in with_grad) and any("norm" in n for n in with_grad)
    # the saved model is a plain (dequantised) checkpoint that loads without bitsandbytes
    model.save_pretrained(tmp_path / "q")
    reloaded = RewardModel.from_pretrained(str(tmp_path / "q")).eval()
    model.eval()
    with torch.no_grad():
        assert (reloaded(ids, attention_mask=mask) - model(ids, attention_mask=mask)).abs().max() < 0.05


def test_checkpoint_key_names_unchanged(tmp_path):
    """One `head` attribute in memory; on disk the names older checkpoints and transformers use."""
    from safetensors.torch import load_file
    for head, want in (("mlp", {"reward_head.fc1.weight", "reward_head.fc1.bias", "reward_head.fc2.weight"}),
                       ("linear", {"score.weight"})):
        model = tiny_rm(head)
        model.save_pretrained(tmp_path / head)
        keys = set(load_file(tmp_path / head / "model.safetensors"))
        assert {k for k in keys if not k.startswith("model.")} == want
        assert all(k.startswith(("model.", "reward_head.", "score.")) for k in keys)
        loaded = RewardModel.from_pretrained(str(tmp_path / head))
        assert all(torch.equal(a, b) for a, b in zip(model.head.parameters(), loaded.head.parameters()))


def test_reward_model_config_kinds(tmp_path):
    ours = {"architectures": ["Qwen3RewardModel"], "reward_model": {"head": "mlp", "pooling": "mean", "seed": 1}}
    assert reward_model_config(ours, "x") == {"head": "mlp", "pooling": "mean", "seed": 1}
    seq_cls = {"architectures": ["Qwen3ForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    assert reward_model_config(seq_cls, "x") == {"head": "linear", "pooling": "last"}
    assert reward_model_config({"architectures": ["Qwen3ForCausalLM"]}, "x") is None
    with pytest.raises(UserError, match="sequence classifier with 2 labels"):
        reward_model_config({**seq_cls, "id2label": {"0": "a", "1": "b"}}, "x")
    with pytest.raises(UserError, match="needs a head"):
        reward_model_config({"reward_model": {"head": "bogus", "pooling": "mean"}}, "x")


@pytest.mark.parametrize("entry,message", [
    ("mlp", "entry 'mlp' needs a head in ('mlp', 'linear')"),
    (["mlp", "mean"], "entry ['mlp', 'mean'] needs a head"),
    ({"head": ["mlp"], "pooling": "mean"}, "needs a head in ('mlp', 'linear') and a pooling"),
    ({"head": "mlp", "pooling": 3}, "needs a head in ('mlp', 'linear') and a pooling"),
    ({"head": "mlp", "pooling": "mean", "max_length": "long"}, "has max_length 'long', which must be a whole number"),
    ({"head": "mlp", "pooling": "mean", "max_length": 1.5}, "has max_length 1.5, which must be a whole number >= 2"),
    ({"head": "mlp", "pooling": "mean", "share_prompt": "no"}, "has share_prompt 'no', which must be true or false"),
    ({"head": "mlp", "pooling": "mean", "dataset": [1]}, "has dataset [1], which must be a name or a list of names"),
])
def test_reward_model_entry_is_checked(entry, message):
    with pytest.raises(UserError) as e:
        reward_model_config({"reward_model": entry}, "DIR")
    assert message in str(e.value) and str(e.value).startswith("DIR: ")


def test_sequence_classifier_fields_of_the_wrong_type():
    with pytest.raises(UserError, match="sequence classifier with None labels"):
        reward_model_config({"architectures": ["Qwen3ForSequenceClassification"], "id2label": ["a"]}, "x")
    assert reward_model_config({"architectures": "Qwen3ForCausalLM"}, "x") is None


def test_weights_are_checked_against_every_kind_of_head(tmp_path):
    """Our mlp and linear heads (reward_head.*, score.weight) and a plain LM: a head tensor missing, of the
    wrong shape, or one the model does not have is named in one line (from the header: see
    test_qwen3.py::test_unexpected_large_tensor_is_refused_before_any_data_is_read)."""
    from safetensors.torch import load_file, save_file
    tiny_rm("mlp").save_pretrained(tmp_path / "mlp")
    tiny_rm("linear", "last").save_pretrained(tmp_path / "linear")
    save_hf_model(tmp_path / "lm")
    cases = [("mlp", lambda s: s.pop("reward_head.fc2.weight"), "1 missing tensor(s): head.fc2.weight"),
             ("linear", lambda s: s.update({"score.weight": torch.ones(2, 64)}),
              "1 mis-shaped tensor(s): head.weight (2, 64) (expected (1, 64))"),
             ("lm", lambda s: s.update({"reward_head.fc1.weight": torch.ones(1)}),
              "1 unexpected tensor(s): head.fc1.weight")]
    for name, edit, message in cases:
        state = load_file(tmp_path / name / "model.safetensors")
        edit(state)
        save_file(state, tmp_path / name / "model.safetensors")
        with pytest.raises(UserError) as e:
            RewardModel.from_pretrained(str(tmp_path / name))
        assert message in str(e.value)
