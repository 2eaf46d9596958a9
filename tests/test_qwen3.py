"""qwen3.py against transformers' Qwen3Model: same weights, same inputs, same hidden states."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_HF, make_hf_cache, save_hf_model
from support.errors import UserError
from support.packing import Layout
from qwen3 import SHAPES, Qwen3, Qwen3Config, reference_attention


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


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one file", "sharded"])
def test_bare_qwen3model_checkpoint_loads(tmp_path, max_shard_size):
    """transformers' bare Qwen3Model.save_pretrained (as embedding models such as Qwen3-Embedding are published)
    names its tensors without the `model.` prefix: embed_tokens.weight, layers.N..., norm.weight. Qwen3 and
    RewardModel (the backbone, with a fresh head) both load it, to its hidden states."""
    from safetensors import safe_open
    from rm import RewardModel
    hf = save_hf_model(tmp_path, cls_name="Qwen3Model", max_shard_size=max_shard_size)
    keys = set()
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            keys |= set(f.keys())
    assert "embed_tokens.weight" in keys and "norm.weight" in keys and not any(k.startswith("model.") for k in keys)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_size is not None)
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state
        assert (Qwen3.from_pretrained(str(tmp_path)).eval()(ids) - want).abs().max() < 1e-5
        reward_model = RewardModel.from_pretrained(str(tmp_path)).eval()
        assert (reward_model.model(ids) - want).abs().max() < 1e-5


def test_rmsnorm_matches_transformers_exactly_in_bf16_and_fp32():
    """Bit for bit, on bf16 input too: normalising in fp32, casting back, then scaling. Computing the mean of
    squares in the input's dtype (bf16) would differ here, though it hides inside the model-level bf16 tolerance."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from qwen3 import RMSNorm
    torch.manual_seed(0)
    x, weight = torch.randn(4, 33, 256) * 3 + 0.5, torch.rand(256) + 0.5
    for dtype in (torch.bfloat16, torch.float32):
        ours, theirs = RMSNorm(256, 1e-6), Qwen3RMSNorm(256, eps=1e-6)
        with torch.no_grad():
            ours.weight.copy_(weight)
            theirs.weight.copy_(weight)
            got, want = ours.to(dtype)(x.to(dtype)), theirs.to(dtype)(x.to(dtype))
        assert got.dtype == want.dtype == dtype and torch.equal(got, want), dtype


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


def test_fused_attention_is_the_written_out_equation(monkeypatch):
    """Every way the model attends (causal rows, the left-padding mask, packed rows by loop and by mask) gives
    the same hidden states when F.scaled_dot_product_attention is replaced by qwen3.reference_attention,
    softmax(q k^T / sqrt(d) + mask) v written out (grouped-query heads included)."""
    model = Qwen3(SHAPES["tiny"]).init_weights(seed=0).eval()
    ids = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    left = torch.ones(2, 9, dtype=torch.long)
    left[1, :4] = 0
    layout = Layout.from_positions(torch.cat([torch.arange(4), torch.arange(5)])[None])  # two sequences in a row

    def forwards():
        with torch.no_grad():
            out = [model(ids), model(ids, attention_mask=left)]
            for impl in ("loop", "mask"):
                model.packed_attention = impl
                out.append(model(ids[:1], layout=layout))
            model.packed_attention = None
            return out

    fused, calls = forwards(), []

    def by_equation(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        assert (attn_mask is None) == is_causal and enable_gqa == (k.shape[1] != q.shape[1])
        calls.append("causal" if is_causal else "mask")
        return reference_attention(q, k, v, attn_mask)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", by_equation)
    written_out = forwards()
    assert {"causal", "mask"} <= set(calls)
    for a, b in zip(fused, written_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


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
    c = SHAPES["0.6b"]
    assert (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (1024, 128, 16, 8)
    with torch.device("meta"):
        assert 0.59e9 < Qwen3(c).num_params(non_embedding=False) < 0.61e9
        assert 1.7e9 < Qwen3(SHAPES["1.7b"]).num_params(non_embedding=False) < 1.75e9


def test_config_roundtrip_and_not_qwen3(tmp_path):
    cfg = Qwen3Config.from_hf_dict({**SHAPES["tiny"].to_hf_dict()})
    assert cfg == SHAPES["tiny"]
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
        "from support.errors import UserError\n"
        "try:\n    Qwen3.from_pretrained('Qwen/NotCached')\nexcept UserError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert ("ERR there is no local directory Qwen/NotCached; as a Hub model id, it is not in the local Hugging "
            "Face cache") in out.stdout


# ---- inputs bounded before they are used ----------------------------------------------------

def edit_config(path, **changes):
    import json
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("field,value,message", [
    ("num_key_value_heads", 0, "num_key_value_heads must be a whole number from 1 to 1,024 (got 0)"),
    ("hidden_size", "64", "hidden_size must be a whole number from 1 to 65,536 (got '64')"),
    ("vocab_size", -5, "vocab_size must be a whole number from 1 to 4,194,304 (got -5)"),
    ("num_hidden_layers", 2.5, "num_hidden_layers must be a whole number from 1 to 1,024 (got 2.5)"),
    ("num_hidden_layers", True, "num_hidden_layers must be a whole number from 1 to 1,024 (got True)"),
    ("num_hidden_layers", 200_000, "num_hidden_layers must be a whole number from 1 to 1,024 (got 200000)"),
    ("num_attention_heads", 3, "num_attention_heads (3) must be a multiple of num_key_value_heads (2)"),
    ("head_dim", 15, "head_dim must be even (got 15)"),
    ("rope_theta", "big", "rope_theta must be a positive number (got 'big')"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps must be a positive number (got -1e-06)"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false (got 'yes')"),
    ("rope_scaling", "linear", "uses rope scaling linear, which is not supported"),
])
def test_config_values_are_checked_before_anything_is_built(field, value, message):
    d = {**SHAPES["tiny"].to_hf_dict(), "rope_parameters": None, field: value}
    with pytest.raises(UserError) as e:
        Qwen3Config.from_hf_dict(d, where="DIR/config.json")
    assert message in str(e.value) and str(e.value).startswith("DIR/config.json")


def test_head_dim_left_out_is_hidden_over_heads_and_checked():
    d = {**SHAPES["tiny"].to_hf_dict()}
    del d["head_dim"]
    assert Qwen3Config.from_hf_dict(d).head_dim == 64 // 4
    with pytest.raises(UserError, match=r"num_attention_heads must be a whole number from 1 to 1,024 \(got 0\)"):
        Qwen3Config.from_hf_dict({**d, "num_attention_heads": 0})


def test_200k_layer_config_is_refused_in_well_under_a_second(tmp_path):
    """It used to build modules for minutes, then die with a MemoryError traceback."""
    import time
    save_hf_model(tmp_path)
    edit_config(tmp_path, num_hidden_layers=200_000)
    start = time.perf_counter()
    with pytest.raises(UserError, match="num_hidden_layers must be a whole number from 1 to 1,024 .got 200000."):
        Qwen3.from_pretrained(str(tmp_path))
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 900}, {"vocab_size": 4096}])
def test_config_that_disagrees_with_the_weights_is_refused_from_the_header(tmp_path, changes):
    save_hf_model(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(UserError, match=r"does not match its config.json: the weights hold 2 layers and embeddings "
                                        r"of shape \(320, 48\), config.json says"):
        Qwen3.from_pretrained(str(tmp_path))


def add_sparse_tensor(path, name, shape):
    """Append fp32 tensor `name` to a safetensors file without writing its data: the file grows as a sparse
    file (no time or disk here), but reading the tensor would still cost its full size in memory."""
    import json
    import math
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    size = 4 * math.prod(shape)
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [len(data), len(data) + size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate(f.tell() + size)


def test_unexpected_large_tensor_is_refused_before_any_data_is_read(tmp_path):
    """A 256 MiB tensor the model does not have: Qwen3 and RewardModel both refuse it from the header, and
    peak RSS (VmHWM, in a fresh process) grows by far less than its size. Reading everything first, as
    loading did before, raised the peak by more than the tensor's size."""
    from safetensors import safe_open
    save_hf_model(tmp_path)
    add_sparse_tensor(tmp_path / "model.safetensors", "model.extra.weight", (64, 1 << 20))
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:  # a valid file, with that tensor
        assert f.get_slice("model.extra.weight").get_shape() == [64, 1 << 20]
    script = (
        "import torch; from support.errors import UserError; from qwen3 import SHAPES, Qwen3; from rm import RewardModel\n"
        "with torch.device('meta'):  # torch's first meta-device module costs ~75 MiB once (lazy imports)\n"
        "    Qwen3(SHAPES['tiny'])\n"
        "def peak_mib():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024\n"
        "for load in (Qwen3.from_pretrained, RewardModel.from_pretrained):\n"
        "    before = peak_mib()\n"
        "    try:\n"
        f"        load({str(tmp_path)!r})\n"
        "    except UserError as e:\n"
        "        print(peak_mib() - before, e)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr
    for line in lines:
        growth, message = line.split(" ", 1)
        assert "1 unexpected tensor(s): " in message and "extra.weight" in message, message
        assert int(growth) < 32, line  # MiB, against a 256 MiB tensor


def test_sharded_index_is_checked(tmp_path):
    import json
    save_hf_model(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    for weight_map in ({"model.norm.weight": "../elsewhere.safetensors"}, ["model-00001.safetensors"], {}):
        index.write_text(json.dumps({**good, "weight_map": weight_map}))
        with pytest.raises(UserError, match="has no valid weight_map"):
            Qwen3.from_pretrained(str(tmp_path))
    index.write_text(json.dumps(good))
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].write_bytes(shards[0].read_bytes())  # the same tensors in two shards
    with pytest.raises(UserError, match=r"tensor \S+ is in two shards"):
        Qwen3.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("text,message", [("[1, 2]", "holds a JSON list, not an object"),
                                          ("[" * 100_000, "is not valid JSON (nested too deeply)")])
def test_config_json_that_is_not_an_object(tmp_path, text, message):
    save_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Qwen3.from_pretrained(str(tmp_path))


def test_oversized_config_json_is_not_read_whole(tmp_path, monkeypatch):
    from support import hub
    save_hf_model(tmp_path)
    monkeypatch.setattr(hub, "MAX_JSON_BYTES", 100)
    with pytest.raises(UserError, match="config.json is over 0 MiB, far more than a config ever holds"):
        Qwen3.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("layout", ["Qwen3ForCausalLM", "Qwen3Model"])
def test_an_unknown_tensor_without_the_model_prefix_is_named_not_dropped(tmp_path, layout):
    """A classifier's `score.weight` (no `model.` prefix) beside the backbone, in the causal-LM layout or the
    bare one: Qwen3.from_pretrained names it, as it names `model.extra.weight`; loading the backbone and
    silently dropping it would hide a checkpoint that is not what the user thinks."""
    save_hf_model(tmp_path, cls_name=layout)
    add_sparse_tensor(tmp_path / "model.safetensors", "score.weight", (1, TINY_HF["hidden_size"]))
    with pytest.raises(UserError, match=r"1 unexpected tensor\(s\): score\.weight;"):
        Qwen3.from_pretrained(str(tmp_path))


def test_a_named_config_is_a_copy_so_changing_it_leaves_the_named_shapes_alone():
    from qwen3 import SHAPES, Qwen3Config
    config = Qwen3Config.from_name("tiny")
    assert config == SHAPES["tiny"]
    config.vocab_size += 1
    assert SHAPES["tiny"].vocab_size == config.vocab_size - 1
