"""Shared test fixtures: tiny random Qwen3 checkpoints written by transformers (our ground truth)."""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

# A tiny Qwen3 with the released models' quirks: head_dim != hidden/heads, GQA, tied embeddings.
TINY_HF = dict(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def save_hf_model(path, cls_name="Qwen3ForCausalLM", seed=0, max_shard_size=None, **overrides):
    """Build a random transformers Qwen3 model, save it with save_pretrained and return it (eval, fp32)."""
    import transformers
    cfg = transformers.Qwen3Config(**{**TINY_HF, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a skipped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.fixture
def hf_tiny(tmp_path):
    """(directory, transformers Qwen3ForCausalLM) of a tiny random checkpoint."""
    d = tmp_path / "tiny-qwen3"
    return d, save_hf_model(d)


def make_hf_cache(cache_root, repo_id, src_dir, kind="models", revision="0" * 40):
    """Lay out `src_dir`'s files the way huggingface_hub caches a repo: blobs are plain copies here."""
    org, name = repo_id.split("/")
    repo = Path(cache_root) / f"{kind}--{org}--{name}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in Path(src_dir).iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture(scope="session")
def demo_tok():
    """The project's own tiny word-level tokenizer (support/demo.py's task): pad != eos."""
    from support.demo import demo_tokenizer
    return demo_tokenizer()


def as_if_stopped_at(run_dir, copy_dir, checkpoint="checkpoint_step_3"):
    """A copy of a finished run as it was when it stopped right after `checkpoint`: only that checkpoint and
    train_config.json kept, ready for --resume."""
    import shutil
    shutil.copytree(run_dir, copy_dir)
    for p in Path(copy_dir).iterdir():
        if p.name not in (checkpoint, "train_config.json"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return copy_dir


@contextmanager
def small_tmpfs(path, size="5m"):
    """A tmpfs of `size` mounted at `path` for a test (a real full disk). Opt-in: only with RM_TEST_MOUNT=1,
    which CI (.ci/run) sets, so running the suite as root on one's own machine never mounts anything;
    skipped where mounting is not allowed."""
    if os.environ.get("RM_TEST_MOUNT") != "1":
        pytest.skip("mounts a tmpfs: set RM_TEST_MOUNT=1 to run it (CI does)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def tiny_rm(tok, head="mlp", pooling="mean", seed=0, min_vocab=0):
    """A RewardModel of qwen3's "tiny" shape for tokenizer `tok` (at least min_vocab embeddings), seeded, eval."""
    import dataclasses
    from qwen3 import SHAPES
    from rm import RewardModel
    config = dataclasses.replace(SHAPES["tiny"], vocab_size=max(tok.vocab_size, min_vocab))
    torch.manual_seed(seed)
    model = RewardModel(config, head=head, pooling=pooling)
    model.model.init_weights(seed=seed)
    model.init_head(seed)
    model.tokenizer = tok
    return model.eval()
