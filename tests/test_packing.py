"""Padding-free (packed) batches give exactly what padded batches give: rewards, loss and gradients."""
from dataclasses import replace

import pytest
import torch

from data import TokenizedPair, collate
from support.packing import choose_collate, choose_impl, collate_packed, collate_shared
from qwen3 import SHAPES
from rm import RewardModel, pairwise_loss

PAD = 3


def random_pairs(n=5, seed=0, vocab=512):
    """Pairs sharing a prompt, with responses of different lengths (a margin on some of them)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 20, (3,), generator=g))
        prompt = torch.randint(4, vocab, (p,), generator=g).tolist()
        chosen = prompt + torch.randint(4, vocab, (c,), generator=g).tolist() + [1]
        rejected = prompt + torch.randint(4, vocab, (r,), generator=g).tolist() + [1]
        items.append(TokenizedPair(chosen, rejected, 0.5 if i % 2 else None, "test", p, c, r))
    return items


def test_collate_packed_layout():
    items = random_pairs(4)
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    for max_tokens in (None, 40):
        b = collate_packed(items, PAD, max_tokens=max_tokens)
        lay = b.layout
        R, L = b.input_ids.shape
        assert L % 8 == 0 and lay.num_sequences == 8 and b.attention_mask is None
        assert R == 1 if max_tokens is None else all(
            int((lay.sequence_ids[r] >= 0).sum()) <= 40 for r in range(R))
        for k, s in enumerate(seqs):  # every sequence exactly once, contiguous, positions from 0
            where = lay.sequence_ids == k
            assert b.input_ids[where].tolist() == s
            assert lay.position_ids[where].tolist() == list(range(len(s)))
        assert (b.input_ids[lay.sequence_ids < 0] == PAD).all()
        assert int(lay.cu_seqlens[-1]) == R * L and lay.max_seqlen == max(
            int(n) for n in lay.cu_seqlens.diff())
        assert torch.equal(lay.sequence_position_ids, lay.position_ids)
        assert int(b.num_tokens()) == sum(len(s) for s in seqs)
    assert b.margin.tolist() == [0.0, 0.5, 0.0, 0.5]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def forward(model, batch):
    """Rewards, then the pairwise loss of the batch's chosen (first half) and rejected (second half)."""
    rewards = model(batch.input_ids, batch.attention_mask, batch.layout)
    chosen, rejected = rewards.chunk(2)
    return {"rewards": rewards, **pairwise_loss(chosen, rejected, batch.margin)}


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = forward(model, batch)
    out["loss"].backward()
    return out, grads(model)


def edge_pairs():
    """Shared prefixes of every kind: none, a 1-token one, identical sequences (all shared), one sequence a
    prefix of the other (all of it shared), responses that begin alike."""
    return [TokenizedPair([5, 6, 7, 1], [8, 9, 1], None, "t", 0, 3, 2),
            TokenizedPair([5, 6, 1], [5, 7, 7, 7, 1], None, "t", 1, 1, 3),
            TokenizedPair([9, 9, 9, 1], [9, 9, 9, 1], None, "t", 2, 1, 1),
            TokenizedPair([4, 4, 6, 1], [4, 4, 6, 1, 7, 1], None, "t", 2, 1, 3),
            TokenizedPair([4, 5, 6, 10, 11, 1], [4, 5, 6, 10, 12, 1], None, "t", 3, 2, 2)]


def test_shared_prompt_layout():
    """Every sequence, read back through expand_index, is exactly its tokens and positions; each
    shared prompt is stored once; keep_index points at a copy of the same token."""
    for items, saved in ((random_pairs(4), None), (edge_pairs(), 0 + 1 + 4 + 4 + 4)):
        seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
        for max_tokens in (None, 40):
            b = collate_packed(items, PAD, max_tokens=max_tokens, share_prompt=True)
            plain = collate_packed(items, PAD, max_tokens=max_tokens)
            lay, plain_lay = b.layout, plain.layout
            ids, pos = b.input_ids.flatten(), lay.position_ids.flatten()
            expand = lay.expand_index
            assert expand.shape == plain.input_ids.shape and b.input_ids.shape[0] == 1
            for key in ("sequence_ids", "cu_seqlens"):
                assert torch.equal(getattr(lay, key), getattr(plain_lay, key))
            assert torch.equal(lay.sequence_position_ids, plain_lay.position_ids)
            for k, s in enumerate(seqs):
                where = lay.sequence_ids == k
                assert ids[expand[where]].tolist() == s
                assert pos[expand[where]].tolist() == list(range(len(s)))
            real = (lay.sequence_ids >= 0).sum()
            n_shared = len(ids) - int((ids == PAD).sum())
            if saved is None:  # random_pairs: the shared prefix is at least the prompt
                assert real - n_shared >= sum(it.prompt_len for it in items)
            else:
                assert real - n_shared == saved
            keep = lay.keep_index[:n_shared]
            assert torch.equal(plain.input_ids.flatten()[keep], ids[:n_shared])
            assert torch.equal(plain_lay.position_ids.flatten()[keep], pos[:n_shared])
            assert torch.equal(b.num_tokens(), plain.num_tokens())
        # the same shared tokens over collate's padded rows
        b, plain = collate_shared(items, PAD), collate(items, PAD)
        lay = b.layout
        assert lay.sequence_position_ids is None and b.attention_mask is None
        assert torch.equal(b.input_ids, collate_packed(items, PAD, share_prompt=True).input_ids)
        assert torch.equal(lay.sequence_ids >= 0, plain.attention_mask.bool())
        ids, expand = b.input_ids.flatten(), lay.expand_index
        real = plain.attention_mask.bool()
        assert torch.equal(ids[expand][real], plain.input_ids[real])
        assert torch.equal(lay.sequence_ids[:, 0], torch.arange(len(seqs)))
        assert torch.equal(b.num_tokens(), plain.num_tokens())


def test_half_a_shared_layout_is_refused():
    """A shared layout always carries its positions (a Layout field). Without keep_index the tokens could
    not take their outputs back from the sequence layout (and without expand_index nothing would copy the
    prompt into both sequences): refused, not wrong."""
    layout = collate_shared(random_pairs(2), PAD).layout
    for half in ({"keep_index": None}, {"expand_index": None}):
        with pytest.raises(ValueError, match="expand_index and keep_index together"):
            replace(layout, **half)


def test_choose_collate():
    items = random_pairs(3)
    for packing, share_prompt, want in ((False, False, collate(items, PAD)),
                                        (False, True, collate_shared(items, PAD)),
                                        (True, False, collate_packed(items, PAD)),
                                        (True, True, collate_packed(items, PAD, share_prompt=True))):
        got = choose_collate(packing, share_prompt)(items, PAD)
        assert torch.equal(got.input_ids, want.input_ids)
        assert (got.layout is None) == (want.layout is None) == (not packing and not share_prompt)
        if got.layout is not None:
            assert torch.equal(got.layout.sequence_ids, want.layout.sequence_ids)
            assert (got.layout.expand_index is None) == (not share_prompt)


@pytest.mark.parametrize("head,pooling", [("mlp", "mean"), ("linear", "last")])
@pytest.mark.parametrize("impl", ["loop", "mask"])
@pytest.mark.parametrize("max_tokens,share_prompt", [(None, False), (48, False), (None, True), (48, True),
                                                     ("padded rows", True)])
def test_packed_equals_padded_fp32(head, pooling, impl, max_tokens, share_prompt):
    torch.manual_seed(0)
    model = RewardModel(SHAPES["tiny"], head=head, pooling=pooling)
    model.model.init_weights(seed=0)
    model.init_head(0).train()
    items = random_pairs(5) + edge_pairs()
    padded, pg = run(model, collate(items, PAD))
    model.model.packed_attention = impl
    if max_tokens == "padded rows":  # shared prompt, attention over collate's padded rows
        packed, kg = run(model, collate_shared(items, PAD))
    else:
        packed, kg = run(model, collate_packed(items, PAD, max_tokens=max_tokens, share_prompt=share_prompt))
    for key in ("rewards", "loss", "accuracy", "margin"):
        assert torch.allclose(packed[key], padded[key], atol=1e-5, rtol=0), key
    assert pg.keys() == kg.keys()
    for name in pg:
        assert (pg[name] - kg[name]).abs().max() < 1e-5, name


def test_packed_with_gradient_checkpointing_and_auto_choice():
    torch.manual_seed(0)
    model = RewardModel(SHAPES["tiny"])
    model.model.init_weights(seed=1)
    model.init_head(1).train()
    items = random_pairs(3, seed=1)
    padded, pg = run(model, collate(items, PAD))
    model.model.gradient_checkpointing = True
    for share_prompt in (False, True):
        batch = collate_packed(items, PAD, share_prompt=share_prompt)
        batch.layout = replace(batch.layout, cu_seqlens=None, max_seqlen=None)  # read off the positions instead
        packed, kg = run(model, batch)
        assert torch.allclose(packed["rewards"], padded["rewards"], atol=1e-5, rtol=0)
        assert max((pg[n] - kg[n]).abs().max() for n in pg) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs CUDA")
def test_varlen_matches_padded_bf16_cuda():
    torch.manual_seed(0)
    model = RewardModel(SHAPES["tiny"]).cuda()
    model.model.init_weights(seed=0)
    model.init_head(0).train()
    items = random_pairs(6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded = forward(model, collate(items, PAD).to("cuda"))
        assert choose_impl(model.model, torch.device("cuda"), torch.bfloat16) == "varlen"
        packed = forward(model, collate_packed(items, PAD).to("cuda"))
        shared = forward(model, collate_packed(items, PAD, share_prompt=True).to("cuda"))
    assert (packed["rewards"] - padded["rewards"]).abs().max() < 0.05  # bf16 rounding
    assert (shared["rewards"] - padded["rewards"]).abs().max() < 0.05


def test_train_packing_matches_padded(tmp_path):
    """train.py --packing and --share_prompt: the same run, padding-free, ends with the same weights (fp32, CPU)."""
    from safetensors.torch import load_file
    from train import RUN_CONFIGS as RUNS, TrainConfig, train
    base = {**RUNS["demo"], "max_train_samples": 32, "max_eval_samples": 8, "batch_size": 4, "max_steps": 3,
            "eval_steps": 1000, "save_steps": 1000, "logging_steps": 3, "warmup_ratio": 0.0, "progress": False,
            "learning_rate": 1e-4}  # Adam turns rounding-level gradient differences into updates ~ lr
    weights = []
    for packing, share_prompt in ((False, False), (True, False), (False, True), (True, True)):
        out = tmp_path / f"packing{packing}{share_prompt}"
        options = {"packing": packing, "share_prompt": share_prompt, "output_dir": str(out)}
        result = train(TrainConfig(**{**base, **options}))
        weights.append(load_file(out / "final_model" / "model.safetensors"))
    for other in weights[1:]:
        assert max((weights[0][k] - other[k]).abs().max().item() for k in weights[0]) < 2e-5
    # eval.py scores a --share_prompt model as it was trained (shared prompts) and reproduces its accuracy
    from eval import main as eval_main
    report = eval_main([str(out), "--max_samples", "8", "--output", str(tmp_path / "report.json")])
    assert report["share_prompt"] is True and report["accuracy"] == result["eval_accuracy"]
