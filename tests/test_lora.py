"""LoRA (support/lora.py): exact start at the base model, gradients only on adapters, merged export = unmerged forward."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from support.errors import UserError
from support.lora import LoRALinear, adapter_state_dict, add_lora, load_adapter_state_dict, merged_state_dict
from qwen3 import SHAPES, Qwen3

CFG = SHAPES["tiny"]


def tiny_backbone(seed=0):
    return Qwen3(CFG).init_weights(seed=seed).eval()


def input_ids(seed=1, shape=(2, 12)):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def randomize_B(model, seed=2, std=0.05):
    """B starts at zero; give it values so that the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)


def quantize_backbone_8bit(backbone, threshold=6.0):
    """As RewardModel.quantize_8bit does: every block linear becomes a frozen int8 Linear8bitLt."""
    pytest.importorskip("bitsandbytes")
    from support.export import quantize_linears_8bit
    return quantize_linears_8bit(backbone, threshold)


def test_init_equals_base_model_exactly():
    base = tiny_backbone()
    lora = add_lora(copy.deepcopy(base), rank=4, dropout=0.1)  # dropout is off in eval mode
    ids = input_ids()
    wrapped = [n for n, m in lora.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 * CFG.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(lora(ids), base(ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(lora(ids), base(ids))
    # and the adapters are not a no-op: a nonzero B changes the output
    randomize_B(lora)
    with torch.no_grad():
        assert not torch.allclose(lora(ids), base(ids), atol=1e-4)


def test_lora_linear_is_the_formula_by_hand():
    """y = x W^T + (alpha / r) x A^T B^T, with a nonzero B and alpha != r, written out by hand (not LoRA against
    LoRA): an inverted scale (r / alpha) or a missing one is caught, in the forward and in the merged weight."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    lora = LoRALinear(base, rank=4, alpha=16.0)  # alpha / r = 4; r / alpha would be 0.25
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 12)
    W, A, B = base.weight.detach(), lora.lora_A.detach(), lora.lora_B.detach()
    want = x @ W.T + (16.0 / 4) * (x @ A.T @ B.T)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x @ lora.merged_weight(torch.float32).T, want, atol=1e-5, rtol=1e-5)
    assert (want - x @ W.T).abs().max() > 0.1  # the update is not negligible: a wrong scale would show


@pytest.mark.parametrize("rank", [1, 4])
def test_the_default_alpha_is_twice_the_rank(rank):
    """As documented (--lora_alpha: "default: 2R"; add_lora's alpha=None): every adapter scales by
    alpha / r = 2, through add_lora and train.py's config alike, and the saved settings say alpha = 2r."""
    from train import TrainConfig
    model = add_lora(tiny_backbone(), rank=rank, alpha=TrainConfig.lora_alpha)
    scales = {m.scale for m in model.modules() if isinstance(m, LoRALinear)}
    assert scales == {2.0} and model.lora_config["alpha"] == 2 * rank
    assert {m.scale for m in add_lora(tiny_backbone(), rank=rank, alpha=3.0).modules()
            if isinstance(m, LoRALinear)} == {3.0 / rank}  # a given alpha is kept


def test_gradients_reach_only_the_adapters():
    model = add_lora(tiny_backbone(), rank=4, targets=("q", "v", "down"))
    model.train()
    model(input_ids()).pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert with_grad and all(n.endswith(("lora_A", "lora_B")) for n in with_grad)
    assert {n.split(".")[3] for n in with_grad} == {"q_proj", "v_proj", "down_proj"}
    for name in ["embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight",
                 "layers.0.self_attn.q_proj.base.weight", "layers.0.self_attn.k_proj.weight"]:
        assert name in dict(model.named_parameters()) and name not in with_grad
    # B gets a gradient from the first step; A only once B is nonzero (its gradient goes through B)
    b_grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B")]
    a_grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_A")]
    assert all(g.abs().sum() > 0 for g in b_grads)
    assert all(torch.count_nonzero(g) == 0 for g in a_grads)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    # the embeddings are frozen, so a block's input needs no grad: checkpointing must still reach the adapters
    grads = []
    for checkpointing in (False, True):
        model = add_lora(tiny_backbone(), rank=4)
        randomize_B(model)  # so that A gets a gradient too
        model.train()
        model.gradient_checkpointing = checkpointing
        model(input_ids()).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5)

def test_training_moves_adapters_only_and_merged_export_matches_fp32():
    base = tiny_backbone()
    model = add_lora(copy.deepcopy(base), rank=4, alpha=16)
    frozen_before = {n: t.clone() for n, t in base.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids()
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()
    model.eval()
    merged = merged_state_dict(model)
    assert set(merged) == set(base.state_dict())  # the plain names, no lora_ keys
    for name, t in model.state_dict().items():      # the base weights themselves never moved
        if "lora_" not in name:
            assert torch.equal(t, frozen_before[name.replace(".base.", ".")])
    plain = Qwen3(CFG).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        expected = model(ids)
        assert not torch.allclose(expected, base(ids), atol=1e-4)  # training changed the model
        torch.testing.assert_close(plain(ids), expected, atol=1e-5, rtol=0)


def test_merged_export_keeps_bf16_base_dtype():
    base = tiny_backbone().to(torch.bfloat16)
    model = add_lora(base, rank=4)
    assert model.layers[0].mlp.up_proj.lora_A.dtype == torch.float32  # adapters stay fp32
    randomize_B(model)
    ids = input_ids()
    with torch.no_grad():
        out = model(ids)  # fp32 adapters on bf16 activations, no autocast
        assert out.dtype == torch.bfloat16
        merged = merged_state_dict(model)
        assert all(t.dtype == torch.bfloat16 for t in merged.values())
        plain = Qwen3(CFG).to(torch.bfloat16).eval()
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(ids).float(), out.float(), atol=5e-2, rtol=5e-2)


def test_int8_base_merged_export_matches_within_bf16_tolerance():
    model = add_lora(quantize_backbone_8bit(tiny_backbone()), rank=4)
    assert model.layers[0].self_attn.q_proj.base.weight.dtype == torch.int8
    randomize_B(model)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids)
        merged = merged_state_dict(model)
        assert not any(k.endswith((".SCB", ".weight_format")) or "lora_" in k for k in merged)
        assert all(t.dtype == torch.float32 for t in merged.values())
        plain = Qwen3(CFG).eval()
        plain.load_state_dict(merged)
        torch.testing.assert_close(plain(ids), expected, atol=2e-2, rtol=2e-2)
    # trains under bf16 autocast, gradients on the adapters only
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).float().pow(2).mean()
    loss.backward()
    assert all(("lora_" in n) == (p.grad is not None) for n, p in model.named_parameters())
    assert model.layers[1].mlp.down_proj.lora_B.grad.dtype == torch.float32


def test_adapter_state_dict_round_trip_and_mismatch():
    model = add_lora(tiny_backbone(), rank=4, targets="q,v")
    randomize_B(model)
    state = {n: t.clone() for n, t in adapter_state_dict(model).items()}
    assert set(state) == {f"layers.{i}.self_attn.{p}_proj.lora_{m}" for i in range(2) for p in "qv" for m in "AB"}
    other = add_lora(tiny_backbone(), rank=4, targets="q,v", seed=5)  # different A, zero B
    load_adapter_state_dict(other, state)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(other(ids), model(ids))
    with pytest.raises(UserError, match="shape"):
        load_adapter_state_dict(add_lora(tiny_backbone(), rank=2, targets="q,v"), state)
    with pytest.raises(UserError, match="missing"):
        load_adapter_state_dict(add_lora(tiny_backbone(), rank=4, targets="q,k,v"), state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "--lora_rank must be at least 1"),
    (dict(rank=4, targets=("q", "qq")), "unknown --lora_targets qq; choose from q,k,v,o,gate,up,down"),
    (dict(rank=CFG.hidden_size + 1), f"larger than .* use at most {CFG.hidden_size}"),
    (dict(rank=4, dropout=1.0), r"--lora_dropout must be in \[0, 1\)"),
])
def test_errors_are_one_line(kwargs, message):
    model = tiny_backbone()
    with pytest.raises(UserError, match=message) as e:
        add_lora(model, **kwargs)
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # checked before changing anything


# ---- on a RewardModel: the backbone at .model gets the adapters, the head trains fully ----------


def tiny_reward_model(head="mlp", pooling="mean"):
    from rm import RewardModel
    model = RewardModel(CFG, head=head, pooling=pooling)
    model.model.init_weights(seed=0)
    return model.init_head(0).eval()


def padded_batch(pad_id=0):
    rows = [[5, 6, 7, 9, 11], [8, 9], [3, 4, 5, 6]]
    ids = torch.full((len(rows), 5), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_reward_model_starts_at_base_rewards_and_only_adapters_and_head_train(head):
    base = tiny_reward_model(head, "mean" if head == "mlp" else "last")
    model = add_lora(copy.deepcopy(base), rank=4, dropout=0.1)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask), base(ids, mask))
    model.train()
    model(ids, mask).square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    head_params = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    assert head_params and head_params <= with_grad
    assert with_grad - head_params == {n for n, _ in model.named_parameters() if "lora_" in n}
    # the checkpoint part: adapters + head, nothing of the frozen backbone
    assert set(adapter_state_dict(model)) == with_grad


def test_reward_model_merged_state_dict_loads_into_plain_reward_model():
    model = add_lora(tiny_reward_model(), rank=8, targets="q,k,v,o")
    randomize_B(model)
    ids, mask = padded_batch()
    plain = tiny_reward_model()
    plain.load_state_dict(merged_state_dict(model))  # strict: same keys as a model without LoRA
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, mask), model(ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("int8", [False, True])
def test_reward_model_merged_save_loads_in_ours_and_transformers(tmp_path, demo_tok, int8):
    from rm import RewardModel
    from transformers import AutoModelForSequenceClassification
    model = tiny_reward_model("linear", "last")
    if int8:
        pytest.importorskip("bitsandbytes")
        model.quantize_8bit()
    model = add_lora(model, rank=4)
    randomize_B(model)
    model.tokenizer = demo_tok
    model.save_pretrained(tmp_path / "rm")
    ids, mask = padded_batch(pad_id=demo_tok.pad_id)
    ours = RewardModel.from_pretrained(str(tmp_path / "rm"))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        expected = model(ids, mask)
        torch.testing.assert_close(ours(ids, mask), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[:, 0], expected, atol=1e-4, rtol=0)


def test_bf16_base_is_bitwise_the_fp32_base_under_autocast():
    """--lora_rank with --bf16 stores the frozen linears in bf16: autocast casts them to exactly that anyway."""
    fp32 = add_lora(tiny_reward_model(), rank=4)
    randomize_B(fp32)
    bf16 = add_lora(tiny_reward_model(), rank=4, base_dtype=torch.bfloat16)
    load_adapter_state_dict(bf16, adapter_state_dict(fp32))
    assert bf16.model.layers[0].mlp.up_proj.base.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    assert bf16.model.norm.weight.dtype == bf16.model.embed_tokens.weight.dtype == torch.float32
    ids, mask = padded_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(bf16(ids, mask), fp32(ids, mask))


# ---- through train.py: checkpoints, resume, the saved model, the command line ------------------------

from test_train import final_weights, run_cli, tiny_cfg  # noqa: E402


def lora_cfg(tmp_path, name, **kw):
    return tiny_cfg(tmp_path, name, **{"lora_rank": 4, "learning_rate": 1e-2, **kw})


@pytest.mark.parametrize("options", [{}, {"bf16": True}, {"model_8bit": True, "bf16": True}])
def test_lora_resume_is_bitwise_exact(tmp_path, options):
    if options.get("model_8bit"):
        pytest.importorskip("bitsandbytes")
    from conftest import as_if_stopped_at
    from train import train
    kw = dict(max_steps=6, save_steps=3, gradient_accumulation_steps=2, lora_dropout=0.1, **options)
    train(lora_cfg(tmp_path, "full", **kw))
    ckpt = tmp_path / "full" / "checkpoint_step_3"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapters", "optimizer.json", "optimizer.safetensors", "trainer_state.json"]
    adapters = load_file(ckpt / "adapters" / "rm_adapters.safetensors")
    assert adapters and all("lora_" in k or k.startswith("head.") for k in adapters)  # no base weights
    out = tmp_path / "resumed"
    as_if_stopped_at(tmp_path / "full", out)
    train(lora_cfg(tmp_path, "resumed", resume="latest", **kw))
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not options:  # a checkpoint of an older train.py (adapter_model.safetensors + adapter_config.json) resumes
        old = as_if_stopped_at(tmp_path / "full", tmp_path / "old")
        (old / "checkpoint_step_3/adapters/rm_adapters.safetensors").rename(
            old / "checkpoint_step_3/adapters/adapter_model.safetensors")
        (old / "checkpoint_step_3/adapters/rm_adapter_config.json").rename(
            old / "checkpoint_step_3/adapters/adapter_config.json")
        train(lora_cfg(tmp_path, "old", resume="latest", **kw))
        c = final_weights(old)
        assert all(torch.equal(a[k], c[k]) for k in a)


def test_adapters_moved_in_from_another_step_are_refused(tmp_path):
    """Each part of a checkpoint records its step: adapters/ of step 2 put into checkpoint_step_4 (a swap that
    resumed silently with the wrong weights) is refused in one line, and the run directory is untouched."""
    import shutil

    from conftest import as_if_stopped_at
    from train import train
    kw = dict(max_steps=6, save_steps=2)
    train(lora_cfg(tmp_path, "full", **kw))
    out = as_if_stopped_at(tmp_path / "full", tmp_path / "run", "checkpoint_step_4")
    shutil.rmtree(out / "checkpoint_step_4" / "adapters")
    shutil.copytree(tmp_path / "full" / "checkpoint_step_2" / "adapters", out / "checkpoint_step_4" / "adapters")
    before = {str(p): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))}
    with pytest.raises(UserError) as e:
        train(lora_cfg(tmp_path, "run", resume="latest", **kw))
    assert str(e.value) == (f"--resume: {out / 'checkpoint_step_4' / 'adapters' / 'rm_adapter_config.json'} is corrupt "
                            "or hand-edited (it belongs to step 2, not to this checkpoint's step 4: moved in from "
                            "another checkpoint); resume from another checkpoint_step_N with --resume PATH, or start "
                            "again with --overwrite_output_dir")
    assert {str(p): p.read_bytes() if p.is_file() else None for p in sorted(out.rglob("*"))} == before


def save_base(path, seed, head="mlp"):
    """A tiny reward model directory (the demo's shape and tokenizer) to train LoRA on."""
    import dataclasses

    from support.demo import demo_tokenizer
    from rm import RewardModel
    tok = demo_tokenizer()
    model = RewardModel(dataclasses.replace(CFG, vocab_size=tok.vocab_size), head=head, pooling="last")
    model.model.init_weights(seed=seed)
    model.init_head(seed)
    model.tokenizer = tok
    model.save_pretrained(path)
    return path


def test_lora_trains_only_adapters_and_head_and_saves_merged_and_adapters(tmp_path):
    from support.lora import apply_adapters
    from rm import RewardModel
    from train import train
    base = save_base(tmp_path / "base", seed=0)
    result = train(lora_cfg(tmp_path, "run", model=str(base), from_scratch=False, lora_targets="q,v",
                            save_adapters=True, max_steps=3))
    before, after = load_file(base / "model.safetensors"), final_weights(tmp_path / "run")
    assert before.keys() == after.keys()
    for k in before:
        adapted = any(f"{t}_proj.weight" in k for t in "qv")
        assert torch.equal(before[k], after[k]) != (adapted or k.startswith("reward_head.")), k
    # the merged final model, and base + adapters, give the same rewards
    merged = RewardModel.from_pretrained(str(tmp_path / "run" / "final_model"))
    unmerged = apply_adapters(RewardModel.from_pretrained(str(base)), tmp_path / "run" / "final_adapters")
    ids, mask = padded_batch(pad_id=merged.tokenizer.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, mask), unmerged(ids, mask), atol=1e-5, rtol=0)
    assert result["eval_accuracy"] >= 0
    # adapters on another base of the same shape: refused, for apply_adapters and for --resume
    save_base(tmp_path / "base", seed=1)
    with pytest.raises(UserError, match="another base model"):
        apply_adapters(RewardModel.from_pretrained(str(base)), tmp_path / "run" / "final_adapters")
    kw = dict(model=str(base), from_scratch=False, lora_targets="q,v", save_steps=2)
    train(lora_cfg(tmp_path, "again", **kw))
    import shutil
    shutil.rmtree(tmp_path / "again" / "final_model")  # as if stopped after its checkpoint: not complete
    save_base(tmp_path / "base", seed=2)
    with pytest.raises(UserError, match="another base model") as e:
        train(lora_cfg(tmp_path, "again", resume="latest", **kw))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["--lora_rank", "4", "--lora_targets", "q,x"], "unknown --lora_targets x"),
    (["--lora_rank", "65"], "--lora_rank 65 is larger than layers.0.self_attn.q_proj (64 -> 128); use at most 64"),
    (["--lora_alpha", "8"], "--lora_alpha without --lora_rank: these configure LoRA"),
    (["--save_adapters"], "--save_adapters without --lora_rank"),
    (["--lora_rank", "4", "--fsdp"], "--lora_rank cannot be combined with --fsdp"),
])
def test_lora_flag_errors_are_one_line(tmp_path, flags, message):
    out = run_cli(["--config", "demo", "--max_train_samples", "16", "--output_dir", str(tmp_path / "o"), *flags])
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr
    assert not (tmp_path / "o").exists()


def test_resume_without_the_lora_flags_is_refused(tmp_path):
    from train import train
    train(lora_cfg(tmp_path, "run", save_steps=2))
    import shutil
    shutil.rmtree(tmp_path / "run" / "final_model")  # as if stopped after its checkpoint: not complete
    with pytest.raises(UserError, match=r"trained with other settings: lora_rank \(4 -> None\)"):
        train(tiny_cfg(tmp_path, "run", save_steps=2, resume="latest"))
    import subprocess
    import sys

    from conftest import ROOT
    out = subprocess.run([sys.executable, "eval.py", str(tmp_path / "run" / "checkpoint_step_2")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "is a LoRA checkpoint" in out.stderr


def test_lora_with_checkpointing_packing_shared_prompts_and_8bit_optim(tmp_path):
    """The memory and speed options change how LoRA trains, not what: same weights (8-bit Adam: it runs)."""
    from test_train import max_diff
    from train import train
    kw = dict(learning_rate=1e-4, max_steps=3)
    train(lora_cfg(tmp_path, "plain", **kw))
    train(lora_cfg(tmp_path, "options", gradient_checkpointing=True, packing=True, share_prompt=True, **kw))
    assert max_diff(final_weights(tmp_path / "plain"), final_weights(tmp_path / "options")) < 1e-5
    pytest.importorskip("bitsandbytes")
    result = train(lora_cfg(tmp_path, "optim8", optim_8bit=True, **kw))
    assert all(h["loss"] == h["loss"] for h in result["history"] if "loss" in h)


def test_lora_ddp_on_two_processes_equals_one(tmp_path):
    from test_distributed import launch, max_diff, weights
    lora = ["--lora_rank", "4", "--lora_dropout", "0"]
    launch(tmp_path / "single", "--batch_size", "4", *lora, procs=1)
    launch(tmp_path / "ddp", "--batch_size", "2", *lora, cwd=tmp_path)
    assert max_diff(weights(tmp_path / "single"), weights(tmp_path / "ddp")) < 1e-5
    assert (tmp_path / "ddp" / "checkpoint_step_2" / "adapters").is_dir()


def test_save_adapters_are_peft_adapters_with_the_merged_models_rewards(tmp_path, capsys):
    """--save_adapters of a linear/last model: PeftModel.from_pretrained on the base as transformers loads it gives
    the merged final model's rewards (fp32, 1e-4); our loader reads the same directory; and adapters written by
    PEFT itself load with apply_adapters, with PEFT's rewards."""
    peft = pytest.importorskip("peft")
    import transformers

    from support.lora import apply_adapters
    from rm import RewardModel
    from train import train
    base = save_base(tmp_path / "base", seed=0, head="linear")
    train(lora_cfg(tmp_path, "run", model=str(base), from_scratch=False, lora_targets="q,v,gate",
                   save_adapters=True, max_steps=3))
    adapters = tmp_path / "run" / "final_adapters"
    assert "in PEFT's layout" in capsys.readouterr().out
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "SEQ_CLS", 4, 8)
    assert config["target_modules"] == ["gate_proj", "q_proj", "v_proj"] and config["modules_to_save"] == ["score"]
    assert config["base_model_name_or_path"] == str(base)
    ids, mask = padded_batch(pad_id=RewardModel.from_pretrained(str(base)).tokenizer.pad_id)
    merged = RewardModel.from_pretrained(str(tmp_path / "run" / "final_model"))
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    in_peft = peft.PeftModel.from_pretrained(hf_base, str(adapters)).eval()
    ours = apply_adapters(RewardModel.from_pretrained(str(base)), adapters)
    with torch.no_grad():
        want = merged(ids, mask)
        assert (want - RewardModel.from_pretrained(str(base))(ids, mask)).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(in_peft(input_ids=ids, attention_mask=mask).logits[:, 0], want, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(ids, mask), want, atol=1e-5, rtol=0)

    # PEFT's own adapters (nonzero B, a trained score head) read by our loader: PEFT's rewards
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    written = peft.get_peft_model(hf_base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "down_proj"],
                                                           task_type="SEQ_CLS", modules_to_save=["score"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in written.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    written.save_pretrained(tmp_path / "peft")
    ours = apply_adapters(RewardModel.from_pretrained(str(base)), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), written.eval()(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   atol=1e-4, rtol=0)


def test_save_adapters_without_a_transformers_model_say_so_and_keep_our_layout(tmp_path, capsys):
    """The mlp head (or mean pooling) has no transformers model: one line says so, and the files do not claim to be
    PEFT's (no adapter_model.safetensors / adapter_config.json); apply_adapters reads them."""
    from support.lora import apply_adapters
    from rm import RewardModel
    from train import train
    base = save_base(tmp_path / "base", seed=0)
    train(lora_cfg(tmp_path, "run", model=str(base), from_scratch=False, save_adapters=True, max_steps=2))
    adapters = tmp_path / "run" / "final_adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["rm_adapter_config.json", "rm_adapters.safetensors"]
    line = next(l for l in capsys.readouterr().out.splitlines() if "adapters saved to" in l)
    assert "PEFT cannot load them" in line and "mlp head" in line
    merged = RewardModel.from_pretrained(str(tmp_path / "run" / "final_model"))
    ids, mask = padded_batch(pad_id=merged.tokenizer.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(apply_adapters(RewardModel.from_pretrained(str(base)), adapters)(ids, mask),
                                   merged(ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config, tensors, message", [
    ({"use_dora": True}, {}, "does not support (peft_type 'LORA', use_dora)"),
    ({"target_modules": "q_proj|v_proj"}, {}, "target_modules 'q_proj|v_proj' are not a list of"),
    ({"target_modules": ["embed_tokens"]}, {}, "are not a list of"),
    ({"peft_type": "IA3"}, {}, "does not support (peft_type 'IA3')"),
    ({"modules_to_save": ["score", "norm"]}, {"base_model.model.model.norm.weight": torch.ones(4)},
     "unexpected tensor 'base_model.model.model.norm.weight'"),
])
def test_peft_adapters_this_loader_cannot_compute_are_refused_in_one_line(tmp_path, config, tensors, message):
    """Only what LoRALinear computes loads: plain LoRA on the block linears, plus the score head. A PEFT version's
    own default modules_to_save names (classifier, pre_classifier) are fine; a tensor of another module is not."""
    from safetensors.torch import save_file

    from support.lora import read_adapters
    base = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "modules_to_save": ["score", "classifier", "pre_classifier"]}
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(4, 2),
             "base_model.model.score.weight": torch.zeros(1, 4)}
    good = tmp_path / "good"
    good.mkdir()
    (good / "adapter_config.json").write_text(json.dumps(base))
    save_file(state, good / "adapter_model.safetensors")
    settings, ours = read_adapters(good)
    assert (settings["rank"], settings["alpha"], settings["targets"]) == (2, 4, "q")
    assert sorted(ours) == ["head.weight", "model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file({**state, **tensors}, bad / "adapter_model.safetensors")
    with pytest.raises(UserError) as e:
        read_adapters(bad)
    assert message in str(e.value) and "\n" not in str(e.value)
