"""Padding-free (packed) batches give exactly what padded batches give: rewards, loss and gradients."""
import pytest
import torch

from data import TokenizedPair, collate, collate_packed
from qwen3 import CONFIGS
from rm import RewardModel

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
        R, L = b["input_ids"].shape
        assert L % 8 == 0 and b["num_sequences"] == 8
        assert R == 1 if max_tokens is None else all(
            int((b["sequence_ids"][r] >= 0).sum()) <= 40 for r in range(R))
        for k, s in enumerate(seqs):  # every sequence exactly once, contiguous, positions from 0
            where = b["sequence_ids"] == k
            assert b["input_ids"][where].tolist() == s
            assert b["position_ids"][where].tolist() == list(range(len(s)))
        assert (b["input_ids"][b["sequence_ids"] < 0] == PAD).all()
        assert int(b["cu_seqlens"][-1]) == R * L and b["max_seqlen"] == max(
            int(n) for n in b["cu_seqlens"].diff())
    assert b["margin"].tolist() == [0.0, 0.5, 0.0, 0.5]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, pairs=True)
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
            ids, pos = b["input_ids"].flatten(), b["position_ids"].flatten()
            expand = b["expand_index"]
            assert expand.shape == plain["input_ids"].shape and b["input_ids"].shape[0] == 1
            for key in ("sequence_ids", "cu_seqlens"):
                assert torch.equal(b[key], plain[key])
            assert torch.equal(b["expanded_position_ids"], plain["position_ids"])
            for k, s in enumerate(seqs):
                where = b["sequence_ids"] == k
                assert ids[expand[where]].tolist() == s
                assert pos[expand[where]].tolist() == list(range(len(s)))
            real = (b["sequence_ids"] >= 0).sum()
            n_shared = len(ids) - int((ids == PAD).sum())
            if saved is None:  # random_pairs: the shared prefix is at least the prompt
                assert real - n_shared >= sum(it.prompt_len for it in items)
            else:
                assert real - n_shared == saved
            keep = b["keep_index"][:n_shared]
            assert torch.equal(plain["input_ids"].flatten()[keep], ids[:n_shared])
            assert torch.equal(plain["position_ids"].flatten()[keep], pos[:n_shared])
        # the same shared tokens over collate's padded rows
        b, plain = collate(items, PAD, share_prompt=True), collate(items, PAD)
        assert b["expanded_position_ids"] is None and "attention_mask" not in b
        assert torch.equal(b["input_ids"], collate_packed(items, PAD, share_prompt=True)["input_ids"])
        assert torch.equal(b["sequence_ids"] >= 0, plain["attention_mask"].bool())
        ids, expand = b["input_ids"].flatten(), b["expand_index"]
        real = plain["attention_mask"].bool()
        assert torch.equal(ids[expand][real], plain["input_ids"][real])
        assert torch.equal(b["sequence_ids"][:, 0], torch.arange(len(seqs)))


def test_shared_batch_without_its_positions_is_refused():
    """Without position_ids a shared batch would attend across its pair's two tails: refused, not wrong."""
    model = RewardModel(CONFIGS["tiny"])
    batch = collate(random_pairs(2), PAD, share_prompt=True)
    del batch["position_ids"]
    with pytest.raises(ValueError, match="position_ids, expand_index and keep_index together"):
        model(**batch)


@pytest.mark.parametrize("head,pooling", [("mlp", "mean"), ("linear", "last")])
@pytest.mark.parametrize("impl", ["loop", "mask"])
@pytest.mark.parametrize("max_tokens,share_prompt", [(None, False), (48, False), (None, True), (48, True),
                                                     ("padded rows", True)])
def test_packed_equals_padded_fp32(head, pooling, impl, max_tokens, share_prompt):
    torch.manual_seed(0)
    model = RewardModel(CONFIGS["tiny"], head=head, pooling=pooling)
    model.model.init_weights(seed=0)
    model.init_head(0).train()
    items = random_pairs(5) + edge_pairs()
    padded, pg = run(model, collate(items, PAD))
    model.model.packed_attention = impl
    if max_tokens == "padded rows":  # shared prompt, attention over collate's padded rows
        packed, kg = run(model, collate(items, PAD, share_prompt=True))
    else:
        packed, kg = run(model, collate_packed(items, PAD, max_tokens=max_tokens, share_prompt=share_prompt))
    for key in ("rewards", "loss", "accuracy", "margin"):
        assert torch.allclose(packed[key], padded[key], atol=1e-5, rtol=0), key
    assert pg.keys() == kg.keys()
    for name in pg:
        assert (pg[name] - kg[name]).abs().max() < 1e-5, name


def test_packed_with_gradient_checkpointing_and_auto_choice():
    torch.manual_seed(0)
    model = RewardModel(CONFIGS["tiny"])
    model.model.init_weights(seed=1)
    model.init_head(1).train()
    items = random_pairs(3, seed=1)
    padded, pg = run(model, collate(items, PAD))
    model.model.gradient_checkpointing = True
    for share_prompt in (False, True):
        batch = collate_packed(items, PAD, share_prompt=share_prompt)
        del batch["cu_seqlens"], batch["max_seqlen"]  # read off the positions instead
        packed, kg = run(model, batch)
        assert torch.allclose(packed["rewards"], padded["rewards"], atol=1e-5, rtol=0)
        assert max((pg[n] - kg[n]).abs().max() for n in pg) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs CUDA")
def test_varlen_matches_padded_bf16_cuda():
    torch.manual_seed(0)
    model = RewardModel(CONFIGS["tiny"]).cuda()
    model.model.init_weights(seed=0)
    model.init_head(0).train()
    items = random_pairs(6)
    to = lambda b: {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded = model(**to(collate(items, PAD)), pairs=True)
        assert model.model.packing_impl(torch.device("cuda"), torch.bfloat16) == "varlen"
        packed = model(**to(collate_packed(items, PAD)), pairs=True)
        shared = model(**to(collate_packed(items, PAD, share_prompt=True)), pairs=True)
    assert (packed["rewards"] - padded["rewards"]).abs().max() < 0.05  # bf16 rounding
    assert (shared["rewards"] - padded["rewards"]).abs().max() < 0.05


def test_train_packing_matches_padded(tmp_path):
    """train.py --packing and --share_prompt: the same run, padding-free, ends with the same weights (fp32, CPU)."""
    from safetensors.torch import load_file
    from train import CONFIGS as RUNS, TrainConfig, train
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
