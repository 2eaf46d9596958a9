"""qwen3.py against transformers' Qwen3Model: same weights, same inputs, same hidden states."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_hf_cache, save_hf_model
from errors import UserError
from packing import Layout
from qwen3 import CONFIGS, Qwen3, Qwen3Config


def hf_hidden(hf_model, input_ids, attention_mask=None):
    with torch.no_grad():
        return hf_model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.mark.parametrize("overrides", [
    {},                                                         # GQA, head_dim 16 != 48/4, tied
    {"num_key_value_heads": 1},                                 # multi-query
    {"num_key_value_heads": 4, "head_dim": 12},                 # plain MHA, head_dim = hidden/heads
    {"tie_word_embeddings": False, "num_hidden_layers": 3},     # untied: lm_head.weight in the file
])
def test_matches_transformers_fp32(tmp_path, overrides):
    hf = save_hf_model(tmp_path, **overrides)
    ours = Qwen3.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids)
    assert (got - hf_hidden(hf, ids)).abs().max() < 1e-5


def test_sharded_checkpoint(tmp_path):
    hf = save_hf_model(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = Qwen3.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - hf_hidden(hf, ids)).abs().max() < 1e-5


def test_right_padding_changes_no_real_token(hf_tiny):
    path, hf = hf_tiny
    ours = Qwen3.from_pretrained(str(path)).eval()
    lengths = [11, 4, 7]
    seqs = [torch.randint(1, 320, (n,)) for n in lengths]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask)
        hf_padded = hf_hidden(hf, ids, mask)
        for i, s in enumerate(seqs):
            alone = ours(s[None])[0]
            assert (padded[i, :len(s)] - alone).abs().max() < 1e-5
            assert (padded[i, :len(s)] - hf_hidden(hf, s[None])[0]).abs().max() < 1e-5
            assert (padded[i, :len(s)] - hf_padded[i, :len(s)]).abs().max() < 1e-5


def test_left_padding_uses_an_explicit_mask(hf_tiny):
    path, hf = hf_tiny
    ours = Qwen3.from_pretrained(str(path)).eval()
    ids = torch.randint(1, 320, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padded row
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), hf_hidden(hf, ids, mask)
    assert (got[mask.bool()] - want[mask.bool()]).abs().max() < 1e-5


def test_packed_rows_equal_separate_sequences(hf_tiny):
    path, _ = hf_tiny
    ours = Qwen3.from_pretrained(str(path)).eval()
    a, b = torch.randint(1, 320, (5,)), torch.randint(1, 320, (8,))
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(5), torch.arange(8)])[None]
    with torch.no_grad():
        got = ours(packed, layout=Layout.from_positions(positions))[0]
        assert (got[:5] - ours(a[None])[0]).abs().max() < 1e-5
        assert (got[5:] - ours(b[None])[0]).abs().max() < 1e-5


def test_bf16_within_bf16_tolerance(hf_tiny):
    path, hf = hf_tiny
    ours = Qwen3.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        got = ours(ids).float()
        want = hf_hidden(hf.to(torch.bfloat16), ids).float()
        exact = hf_hidden(hf.float(), ids)
    assert (got - want).abs().max() < 0.05
    assert (got - exact).abs().max() < 0.1  # bf16 rounding, not a bug


def test_bf16_autocast_over_fp32_weights_matches_transformers(hf_tiny):
    path, hf = hf_tiny
    ours = Qwen3.from_pretrained(str(path)).eval()
    ids = torch.randint(0, 320, (2, 13))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(ids).float(), hf_hidden(hf, ids).float()
    assert (got - want).abs().max() < 0.05


def test_lm_head_logits_match(tmp_path):
    hf = save_hf_model(tmp_path, tie_word_embeddings=False)
    ours = Qwen3.from_pretrained(str(tmp_path), lm_head=True).eval()
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        assert (ours.lm_logits(ours(ids)) - hf(ids).logits).abs().max() < 1e-4


def test_gradient_checkpointing_same_gradients(hf_tiny):
    path, _ = hf_tiny
    grads = []
    for ckpt in (False, True):
        model = Qwen3.from_pretrained(str(path)).train()
        model.gradient_checkpointing = ckpt
        ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
        model(ids).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=0), name


def test_weights_load_in_requested_dtype_without_meta_leftovers(hf_tiny):
    path, _ = hf_tiny
    model = Qwen3.from_pretrained(str(path), dtype=torch.bfloat16)
    assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())


def test_named_configs_match_released_models():
    c = CONFIGS["0.6b"]
    assert (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (1024, 128, 16, 8)
    with torch.device("meta"):
        assert 0.59e9 < Qwen3(c).num_params(non_embedding=False) < 0.61e9
        assert 1.7e9 < Qwen3(CONFIGS["1.7b"]).num_params(non_embedding=False) < 1.75e9


def test_config_roundtrip_and_not_qwen3(tmp_path):
    cfg = Qwen3Config.from_hf_dict({**CONFIGS["tiny"].to_hf_dict()})
    assert cfg == CONFIGS["tiny"]
    with pytest.raises(UserError, match="not a Qwen3 config"):
        Qwen3Config.from_hf_dict({"model_type": "llama", "hidden_size": 8})


# ---- clear errors ---------------------------------------------------------------------------

def test_missing_directory():
    with pytest.raises(UserError, match="does not exist"):
        Qwen3.from_pretrained("/no/such/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="config.json is missing"):
        Qwen3.from_pretrained(str(tmp_path))


def test_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file
    save_hf_model(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"1 missing tensor\(s\): layers.1.mlp.up_proj.weight"):
        Qwen3.from_pretrained(str(tmp_path))


def test_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file
    save_hf_model(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"mis-shaped tensor\(s\): norm.weight \(7,\) \(expected \(48,\)\)"):
        Qwen3.from_pretrained(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    save_hf_model(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        Qwen3.from_pretrained(str(tmp_path))


def test_garbage_safetensors(tmp_path):
    save_hf_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="corrupt or truncated"):
        Qwen3.from_pretrained(str(tmp_path))


def test_load_by_repo_id_from_hf_cache_offline(tmp_path):
    """The real huggingface_hub code path: a cache laid out as it lays it out, HF_HUB_OFFLINE=1."""
    src = tmp_path / "src"
    hf = save_hf_model(src)
    make_hf_cache(tmp_path / "hub", "Qwen/Qwen3-Tiny", src)
    ids = torch.randint(0, 320, (1, 5))
    torch.save({"ids": ids, "want": hf_hidden(hf, ids)}, tmp_path / "io.pt")
    script = (
        "import torch; from qwen3 import Qwen3\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        "m = Qwen3.from_pretrained('Qwen/Qwen3-Tiny').eval()\n"
        "with torch.no_grad(): d = (m(io['ids']) - io['want']).abs().max().item()\n"
        "assert d < 1e-5, d\n"
        "from errors import UserError\n"
        "try:\n    Qwen3.from_pretrained('Qwen/NotCached')\nexcept UserError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ERR model Qwen/NotCached is not in the local Hugging Face cache" in out.stdout
