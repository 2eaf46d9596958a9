"""tools/bench.py runs on CPU and prints every figure, alone and against transformers."""
import json
import subprocess
import sys

import numpy as np

from tools import bench
import qwen3
from conftest import ROOT

FIGURES = ("tokens/s", "model TFLOP/s", "MFU", "peak memory", "step time", "median", "min", "max")
SMALL = ["--config", "tiny", "--device", "cpu", "--pairs", "2", "--max_length", "32", "--warmup", "1",
         "--steps", "2", "--batches", "2"]


def test_bench_prints_every_figure(capsys, tmp_path):
    bench.main(SMALL + ["--json", str(tmp_path / "r.jsonl")])
    out = capsys.readouterr().out
    ours = [l for l in out.splitlines() if l.startswith("ours ")]
    assert len(ours) == 1 and all(f in ours[0] for f in FIGURES), out
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["ours"]["tokens_per_s"] > 0 and "transformers" not in row


def test_bench_compare_hf_realistic_packed(capsys):
    bench.main(SMALL + ["--compare-hf", "--lengths", "realistic", "--max_length", "64", "--packing"])
    out = capsys.readouterr().out
    for side in ("ours ", "transformers ", "ours/transformers"):
        lines = [l for l in out.splitlines() if l.startswith(side)]
        assert len(lines) == 1, out
    ratio = [l for l in out.splitlines() if l.startswith("ours/transformers")][0]
    assert all(f in ratio for f in ("tokens/s", "model TFLOP/s", "MFU", "peak memory", "step time")), ratio


def test_realistic_lengths_and_flops():
    rng = np.random.default_rng(0)
    items = bench.make_pairs(400, 512, "realistic", 1000, rng)
    chosen = [len(it.chosen_ids) for it in items]
    assert 16 <= min(chosen) and max(chosen) <= 512 and 130 < np.median(chosen) < 210
    assert all(it.chosen_ids[:it.prompt_len] == it.rejected_ids[:it.prompt_len] for it in items)
    assert all(max(it.chosen_ids + it.rejected_ids) < 999 for it in items)  # the last id is the pad
    cfg = qwen3.SHAPES["tiny"]
    assert bench.step_flops(cfg, 1000, [4, 2]) == 6 * 1000 * 6 + 6 * 2 * 4 * 32 * (16 + 4)


def test_cli_user_error_is_one_line():
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--config", "nope", "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown --config" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_bench_best_of_n_prints_the_speed_up_and_equal_rewards(capsys):
    results = bench.main(["--config", "tiny", "--device", "cpu", "--best_of_n", "2,3", "--prompt_length", "24",
                          "--response_length", "8", "--warmup", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert [l.split()[0] for l in out.splitlines()] == ["best-of-2", "best-of-3"]
    for n, row in results.items():
        assert row["speedup"] > 0 and row["max_abs_diff"] < 1e-5
        assert row["tokens"][1] < row["tokens"][0]  # the prompt's tokens once, not n times


def test_a_count_of_zero_is_refused_not_taken_for_the_default(capsys):
    """--steps 0, --pairs 0, --max_length 0 ran the defaults (10 steps, 8 pairs, 512 tokens) as if not given,
    and --ranked 0 the pairwise benchmark: each is one line naming the flag; --warmup 0 is a real choice."""
    import pytest
    from support.errors import UserError
    for flag in ("--steps", "--pairs", "--max_length", "--batches", "--ranked", "--prompt_length"):
        for value in ("0", "-3"):
            with pytest.raises(UserError, match=f"^{flag} must be a positive integer \\(got {value}\\); leave it out"):
                bench.main(SMALL + [flag, value])
    with pytest.raises(UserError, match="^--steps must be a positive integer"):
        bench.main(["--suite", "cpu", "--steps", "0"])
    with pytest.raises(UserError, match="^--warmup must be 0 or more"):
        bench.main(SMALL + ["--warmup", "-1"])
    bench.main(SMALL + ["--warmup", "0"])
    assert "ours " in capsys.readouterr().out


def test_bench_ranked_counts_a_groups_tokens_once_per_prompt(capsys):
    results = bench.main(["--config", "tiny", "--device", "cpu", "--ranked", "4", "--pairs", "2", "--max_length", "64",
                          "--lengths", "realistic", "--warmup", "0", "--steps", "1", "--batches", "1"])
    group, few, every = (results[k]["tokens_per_group"] for k in ("group, prompt once", "3 pairs (best vs each)",
                                                                   "6 pairs (all)"))
    assert group < few < every and every > 3 * group  # the prompt once, each response once
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
