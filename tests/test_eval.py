"""eval.py: every statistic against a hand computation, evaluate() with a stub model, the CLI end to end."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import numpy as np
import torch.nn as nn

from conftest import ROOT, save_hf_model
from data import DataStats, Pair, load_pairs, tokenize_pairs
from support.errors import UserError, run_cli
from eval import average_ranks, evaluate, main, pearson, report_from_rewards, spearman, wilson_interval
from support.hub import find_model_dir
from rm import RewardModel
from support.export import reward_model_config
from test_rm import tiny_rm

# Five pairs with known rewards, lengths and sources. Margins 1, -0.5, 0 (a tie: wrong), 2, 0.0625.
# (Values exact in float32, so the stub model of evaluate() reproduces them bit for bit.)
CHOSEN = [2.0, 0.5, 1.0, -1.0, 0.0625]
REJECTED = [1.0, 1.0, 1.0, -3.0, 0.0]
CHOSEN_LEN = [10, 3, 5, 8, 4]
REJECTED_LEN = [4, 6, 5, 2, 4]
SOURCES = ["a", "b", "a", "b", "a"]


def nls(x):  # -log(sigmoid(x)) written out
    return math.log(1 + math.exp(-x))


def hand_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def wilson_by_quadratic(k, n, z=1.959963984540054):
    """Wilson's bounds are the proportions pi with |p - pi| = z * sqrt(pi (1 - pi) / n): the roots of
    (n + z^2) pi^2 - (2 n p + z^2) pi + n p^2 = 0."""
    p = k / n
    a, b, c = n + z * z, -(2 * n * p + z * z), n * p * p
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


def close(a, b, tol=1e-9):
    return a is not None and abs(a - b) < tol


# ---- the pure statistics ----------------------------------------------------------------------

def test_wilson_interval():
    for k, n in ((3, 5), (40, 50), (1, 1), (0, 10), (7, 7)):
        low, high = wilson_interval(k, n)
        want = wilson_by_quadratic(k, n)
        assert close(low, max(0.0, want[0])) and close(high, min(1.0, want[1]))
    # published values (e.g. Newcombe 1998): 0/10 -> [0, 0.2775]; 3/5 -> [0.2307, 0.8824]
    assert close(wilson_interval(0, 10)[1], 0.27753, 1e-4)
    assert all(close(x, w, 1e-4) for x, w in zip(wilson_interval(3, 5), (0.23072, 0.88237)))
    assert wilson_interval(0, 0) == (None, None)


def test_correlations_with_ties():
    # average ranks: the three 4s share ranks 3,4,5 -> 4; the two 5s share 6,7 -> 6.5
    assert average_ranks([10, 3, 5, 8, 4, 4, 6, 5, 2, 4]).tolist() == [10, 2, 6.5, 9, 4, 4, 8, 6.5, 1, 4]
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 7]
    assert close(pearson(x, y), hand_pearson(x, y))
    # Spearman of a monotone but non-linear relation is exactly 1; Pearson is not
    assert close(spearman([1, 2, 3, 4], [1, 4, 9, 100]), 1.0) and pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.95
    assert close(spearman([1, 2, 2, 3], [1, 3, 2, 4]), hand_pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4]))
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None  # undefined, not NaN


def test_report_by_hand():
    rep = report_from_rewards(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, SOURCES, unsure_threshold=0.1)
    margins = [1.0, -0.5, 0.0, 2.0, 0.0625]
    assert rep["num_pairs"] == 5
    assert close(rep["accuracy"], 3 / 5)                              # the tie counts as wrong
    assert all(close(a, b) for a, b in zip(rep["accuracy_ci95"], wilson_by_quadratic(3, 5)))
    assert close(rep["loss"], sum(nls(m) for m in margins) / 5)

    # reward distribution; numpy's linear percentiles: sorted chosen = -1, 0.0625, 0.5, 1, 2
    ch = rep["rewards"]["chosen"]
    mean = sum(CHOSEN) / 5
    assert close(ch["mean"], 2.5625 / 5) and close(ch["min"], -1) and close(ch["max"], 2)
    assert close(ch["std"], math.sqrt(sum((v - mean) ** 2 for v in CHOSEN) / 5))    # population std
    assert close(ch["p5"], -1 + 0.2 * 1.0625) and close(ch["p25"], 0.0625) and close(ch["p50"], 0.5)
    assert close(ch["p75"], 1.0) and close(ch["p95"], 1 + 0.8 * 1)
    rj = rep["rewards"]["rejected"]  # sorted -3, 0, 1, 1, 1
    assert close(rj["mean"], 0.0) and close(rj["p50"], 1.0) and close(rj["p5"], -3 + 0.2 * 3)

    m = rep["margin"]
    mm = sum(margins) / 5
    assert close(m["mean"], mm) and close(m["min"], -0.5) and close(m["max"], 2.0)
    assert close(m["std"], math.sqrt(sum((v - mm) ** 2 for v in margins) / 5))
    assert close(m["unsure_share"], 2 / 5)                            # margins 0 and 0.0625

    ln = rep["length"]
    lengths, rewards = CHOSEN_LEN + REJECTED_LEN, CHOSEN + REJECTED
    assert close(ln["pearson"], hand_pearson(lengths, rewards))
    length_ranks = [10, 2, 6.5, 9, 4, 4, 8, 6.5, 1, 4]               # by hand, ties averaged
    reward_ranks = [10, 5, 7.5, 2, 4, 7.5, 7.5, 7.5, 1, 3]           # the four 1.0s share ranks 6..9
    assert close(ln["spearman"], hand_pearson(length_ranks, reward_ranks))
    # chosen longer: pairs 0, 3 (both right); shorter: pair 1 (wrong); same length: pairs 2 (tie), 4 (right)
    assert (ln["chosen_longer"]["num_pairs"], ln["chosen_longer"]["accuracy"]) == (2, 1.0)
    assert (ln["chosen_shorter"]["num_pairs"], ln["chosen_shorter"]["accuracy"]) == (1, 0.0)
    assert (ln["same_length"]["num_pairs"], ln["same_length"]["accuracy"]) == (2, 0.5)
    # "longer is better" on the 3 pairs of different length: right on 0 and 3; the model too (0, 3)
    assert ln["num_different_length"] == 3
    assert close(ln["longer_is_better_accuracy"], 2 / 3) and close(ln["model_accuracy_on_different_length"], 2 / 3)

    a, b = rep["per_source"]["a"], rep["per_source"]["b"]             # a: pairs 0, 2, 4; b: pairs 1, 3
    assert (a["num_pairs"], b["num_pairs"]) == (3, 2)
    assert close(a["accuracy"], 2 / 3) and close(b["accuracy"], 1 / 2)
    assert all(close(x, w) for x, w in zip(a["ci95"], wilson_by_quadratic(2, 3)))
    assert close(a["loss"], (nls(1.0) + nls(0.0) + nls(0.0625)) / 3) and close(b["margin_mean"], 0.75)
    json.dumps(rep, allow_nan=False)  # valid JSON: no NaN anywhere


def test_report_edge_cases_are_null_not_nan():
    rep = report_from_rewards([1.0, 2.0], [0.0, 3.0], [5, 5], [5, 5])  # all same length, one source
    assert rep["length"]["pearson"] is None and rep["length"]["longer_is_better_accuracy"] is None
    assert rep["length"]["chosen_longer"] == {"num_pairs": 0, "accuracy": None, "ci95": [None, None]}
    assert list(rep["per_source"]) == [""]
    json.dumps(rep, allow_nan=False)


# ---- evaluate() with a stub model ---------------------------------------------------------------

class LookupRM(nn.Module):
    """A stub reward model: the reward of a sequence is looked up by its real (unpadded) token ids."""

    def __init__(self, tokenizer, table):
        super().__init__()
        self.tokenizer, self.table = tokenizer, table
        self.dummy = nn.Parameter(torch.zeros(()))  # something to tell the device by
        self.calls = []

    def forward(self, input_ids, attention_mask=None, layout=None):
        assert layout is None  # padded rows: eval.py's default batches
        self.calls.append((input_ids.shape[0], self.training, torch.is_grad_enabled()))
        rows = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]
        return torch.tensor([self.table[r] for r in rows], dtype=torch.float32)


def test_evaluate_with_stub_model_matches_hand_numbers(demo_tok):
    words = "kitten whiskers purring fur litter puppy leash barking fetch collar".split()
    pairs = [Pair(f"\n\nHuman: tell me about {topic}\n\nAssistant:", " " + " ".join(words[:lc]),
                  " " + " ".join(words[-lr:]), source=s)     # a prompt of its own: every sequence differs
             for topic, lc, lr, s in zip(["cats", "dogs", "chess", "coffee", "oceans"], CHOSEN_LEN, REJECTED_LEN,
                                         SOURCES)]
    pairs.append(Pair("\n\nHuman: hi\n\nAssistant:", " " + " ".join(words * 3), " cats", source="a"))  # > 24 tokens
    table = {}
    for pair, c, r in zip(pairs, CHOSEN, REJECTED):
        assert len(demo_tok.encode(pair.chosen)) == len(pair.chosen.split())  # one token per word
        for response, reward in ((pair.chosen, c), (pair.rejected, r)):
            table[tuple(demo_tok.encode(pair.prompt) + demo_tok.encode(response) + [demo_tok.eos_id])] = reward
    assert len(table) == 10
    model = LookupRM(demo_tok, table).train()
    stats = DataStats(read=9, kept=6, skipped={"empty field": 2, "chosen == rejected": 1})
    rep = evaluate(model, pairs, batch_size=2, max_length=24, progress=False, stats=stats)

    want = report_from_rewards(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN, SOURCES)
    assert rep.pop("counts") == {"evaluated": 5, "skipped": 3, "dropped_too_long": 1, "truncated_prompt": 0,
                                 "skipped_reasons": {"chosen == rejected": 1, "empty field": 2}}
    assert rep == want                         # response lengths, sources and rewards reached the statistics
    assert close(rep["accuracy"], 0.6) and close(rep["length"]["longer_is_better_accuracy"], 2 / 3)
    # chosen and rejected in one pass, batches of 2 pairs (the 5th alone); eval mode, no grad; mode restored
    assert [c[0] for c in model.calls] == [4, 4, 2]
    assert all(not training and not grad for _, training, grad in model.calls) and model.training
    assert stats.dropped_too_long == 0         # the caller's stats are not modified
    # train.py's path: pairs tokenised once, evaluated many times
    items = tokenize_pairs(pairs, demo_tok, 24)
    assert evaluate(model, items, batch_size=3, progress=False)["length"] == want["length"]
    with pytest.raises(UserError, match="no pairs"):
        evaluate(model, [], progress=False)


def test_find_model_dir_layouts(tmp_path):
    """A model dir, a train.py checkpoint (model/ inside), a train.py output dir (final_model/ inside);
    hub.find_model_dir finds it, export.reward_model_config tells a reward model from a plain LM."""
    rm_cfg = {"architectures": ["Qwen3RewardModel"], "reward_model": {"head": "mlp", "pooling": "mean"}}
    for sub in ("plain", "checkpoint_step_5/model", "out/final_model"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "config.json").write_text(json.dumps(rm_cfg))
    assert find_model_dir(str(tmp_path / "plain")) == (tmp_path / "plain", tmp_path / "plain")
    assert find_model_dir(str(tmp_path / "checkpoint_step_5"))[0] == tmp_path / "checkpoint_step_5" / "model"
    assert find_model_dir(str(tmp_path / "out")) == (tmp_path / "out" / "final_model", tmp_path / "out")
    with pytest.raises(UserError, match="final_model"):
        find_model_dir(str(tmp_path))
    settings = reward_model_config(rm_cfg, tmp_path / "plain")
    assert {k: settings[k] for k in ("head", "pooling")} == {"head": "mlp", "pooling": "mean"}
    seq_cls = {"architectures": ["Qwen3ForSequenceClassification"]}  # a published transformers reward model
    assert reward_model_config(seq_cls, "seq_cls") == {"head": "linear", "pooling": "last"}
    assert reward_model_config({"architectures": ["Qwen3ForCausalLM"]}, "lm") is None  # a plain LM: refused


# ---- the real model, in process and from the command line ---------------------------------------

@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, demo_tok):
    """A tiny saved reward model that records it was trained on the demo data at max_length 64."""
    d = tmp_path_factory.mktemp("eval") / "run"
    model = tiny_rm()
    model.tokenizer = demo_tok
    model.provenance = {"dataset": ["demo"], "max_length": 64}
    model.save_pretrained(d / "final_model")  # a train.py output directory: the model is in final_model/
    return d


def run_eval(*args):
    # one thread: on a busy 2-core machine, torch's thread pool spinning costs more than it gains here
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RM_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env)


def test_cli_report_matches_evaluate(rm_dir, tmp_path):
    out = tmp_path / "report.json"
    proc = run_eval(rm_dir, "--dataset", "demo", "--max_samples", 40, "--batch_size", 8, "--output", out,
                    "--device", "cpu")  # the same device as the in-process run below
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for key in ("accuracy", "accuracy_ci95", "num_pairs", "rewards", "margin", "length", "per_source", "loss",
                "counts", "checkpoint", "dataset", "split", "max_length", "date"):
        assert key in report, key
    assert report["num_pairs"] == 40 and report["dataset"] == ["demo"] and report["split"] == "test"
    assert report["max_length"] == 64 and list(report["per_source"]) == ["demo"]
    assert "accuracy (95% Wilson CI)" in proc.stdout

    model = RewardModel.from_pretrained(str(rm_dir / "final_model"))
    pairs = load_pairs("demo", split="test", max_samples=40)
    again = evaluate(model, pairs, batch_size=8, max_length=64, progress=False)
    assert again["accuracy"] == report["accuracy"]
    assert abs(again["rewards"]["chosen"]["mean"] - report["rewards"]["chosen"]["mean"]) < 1e-6
    # bf16 autocast: the same pairs, rewards close to fp32
    bf16 = evaluate(model, pairs, batch_size=8, max_length=64, progress=False, bf16=True)
    assert bf16["num_pairs"] == 40
    assert abs(bf16["rewards"]["chosen"]["mean"] - again["rewards"]["chosen"]["mean"]) < 0.02
    # shared-prompt batches: the same rewards, pair by pair
    _, (c0, r0, _, _) = evaluate(model, pairs, batch_size=8, max_length=64, progress=False, return_rewards=True)
    _, (c1, r1, _, _) = evaluate(model, pairs, batch_size=8, max_length=64, progress=False, return_rewards=True,
                                 share_prompt=True)
    assert abs(c0 - c1).max() < 1e-5 and abs(r0 - r1).max() < 1e-5


def test_cli_defaults_in_process(rm_dir, capsys):
    """No --dataset/--max_length: the training ones; the report lands in the directory given."""
    report = main([str(rm_dir), "--max_samples", "8", "--max_length", "40", "--device", "cpu"])
    assert report["dataset"] == ["demo"] and report["max_length"] == 40
    assert json.loads((rm_dir / "evaluation_report.json").read_text())["accuracy"] == report["accuracy"]
    assert "report:" in capsys.readouterr().out


def test_plots(rm_dir, tmp_path):
    pytest.importorskip("matplotlib")
    main([str(rm_dir), "--max_samples", "8", "--plots", str(tmp_path / "plots"), "--output", str(tmp_path / "r.json")])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["margins.png", "reward_vs_length.png",
                                                                      "rewards.png"]


def test_plots_without_matplotlib_fail_before_scoring(rm_dir, tmp_path, monkeypatch, capsys):
    import eval as eval_module
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setattr(eval_module, "score_pairs", lambda *a, **k: pytest.fail("scored before the check"))
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(rm_dir), "--plots", str(tmp_path / "p"), "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "matplotlib" in err[0] and err[0].startswith("error:")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("case", ["missing", "causal_lm", "wrong_columns", "empty_dataset", "bad_option"])
def test_cli_errors_are_one_line_and_write_nothing(case, rm_dir, tmp_path, capsys):
    """Three cases as real processes (nothing else reaches stderr: no warning, no traceback), two in
    process through errors.run_cli, which is what `python eval.py` runs: same exit code and stderr."""
    ckpt, extra = rm_dir, []
    if case == "missing":
        ckpt = tmp_path / "no_such_run"
    elif case == "causal_lm":
        ckpt = tmp_path / "lm"
        save_hf_model(ckpt)
    elif case == "wrong_columns":
        (tmp_path / "data.jsonl").write_text('{"question": "hi?", "answer": "hello"}\n')
        extra = ["--dataset", tmp_path / "data.jsonl"]
    elif case == "empty_dataset":
        (tmp_path / "empty.jsonl").write_text("")
        extra = ["--dataset", tmp_path / "empty.jsonl"]
    else:
        extra = ["--batch_size", 0]
    out = tmp_path / "report.json"
    if case in ("missing", "causal_lm", "wrong_columns"):
        proc = run_eval(ckpt, *extra, "--output", out)
        code, stderr = proc.returncode, proc.stderr
    else:
        with pytest.raises(SystemExit) as e:
            run_cli(main, [str(a) for a in (ckpt, *extra, "--output", out)])
        code, stderr = e.value.code, capsys.readouterr().err
    err = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(err) == 1 and err[0].startswith("error:"), stderr
    assert not out.exists()
    if case == "causal_lm":
        assert "not a reward model" in err[0]


# ---- where the report goes, and which data (#14) ------------------------------------------------

def test_output_never_replaces_what_is_not_a_report(rm_dir, tmp_path, capsys):
    model = rm_dir / "final_model"
    for victim in (model / "model.safetensors", model / "config.json", tmp_path / "notes.json"):
        if not victim.exists():
            victim.write_text('{"a": 1}')
        before = victim.read_bytes()
        with pytest.raises(SystemExit) as e:
            run_cli(main, [str(rm_dir), "--output", str(victim), "--max_samples", "4", "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "exists and is not an evaluation report" in err[0], err
        assert victim.read_bytes() == before
    # a trailing slash names a directory, created; a previous report there is replaced
    for _ in range(2):
        report = main([str(rm_dir), "--output", str(tmp_path / "newdir") + "/", "--max_samples", "4",
                       "--device", "cpu"])
        assert not (tmp_path / "newdir").is_file()
        assert json.loads((tmp_path / "newdir" / "evaluation_report.json").read_text())["date"] == report["date"]
    main([str(rm_dir), "--output", str(tmp_path / "newdir"), "--max_samples", "4", "--device", "cpu"])  # exists


def test_a_comma_in_a_recorded_dataset_name(tmp_path, demo_tok):
    """train.py records --dataset as a list; eval.py takes it as it is, so a file name may hold a comma."""
    from support.demo import demo_rows
    path = tmp_path / "pairs,v1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in zip(demo_rows("test"), range(6))))
    model = tiny_rm()
    model.tokenizer = demo_tok
    model.provenance = {"dataset": [str(path)], "max_length": 64}
    model.save_pretrained(tmp_path / "m")
    report = main([str(tmp_path / "m"), "--device", "cpu"])
    assert report["dataset"] == [str(path)] and report["counts"]["evaluated"] == 6
    report = main([str(tmp_path / "m"), "--dataset", str(path), "--device", "cpu", "--output", str(tmp_path / "r.json")])
    assert report["dataset"] == [str(path)] and report["counts"]["evaluated"] == 6


def test_the_summary_aligns_long_source_paths_and_counts_in_words(rm_dir, tmp_path, capsys):
    """The per-source rows line up with the overall accuracy whatever a path's length (a deep path pushed its
    numbers right), a path over 40 characters is shown by its end, and counts read "1 row", not "1 rows"."""
    deep = tmp_path / ("a-rather-long-directory-name-for-the-data" * 2) / "held_out_pairs.jsonl"
    deep.parent.mkdir()
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in load_pairs("demo", "test", 6)]
    same = {"prompt": rows[0]["prompt"], "chosen": " yes", "rejected": " yes"}  # a row that is skipped
    deep.write_text("\n".join(json.dumps(r) for r in [rows[0], same, *rows[1:]]) + "\n")
    main([str(rm_dir), "--dataset", "demo", str(deep), "--max_samples", "12", "--output", str(tmp_path / "r.json")])
    out = capsys.readouterr().out.splitlines()
    head = next(line for line in out if line.startswith("evaluated "))
    assert head.endswith(": 12 pairs, 1 row skipped, 0 longer than 64 tokens dropped"), head
    table = [line for line in out if line.startswith("accuracy (95% Wilson CI)")]
    start = out.index(table[0])
    rows = out[start:start + 4]
    assert sorted(row.split()[0] for row in rows[1:3]) == ["demo", "…" + str(deep)[-39:]], rows
    columns = {line.index("  [") for line in rows[:3]}  # where each row's "accuracy  [low, high]" CI starts
    assert len(columns) == 1 and rows[3].startswith("loss (-log sigmoid margin)"), rows


def test_reward_vs_length_plot_keeps_its_legend_off_the_points_and_ticks_whole_tokens(tmp_path, monkeypatch):
    """The legend sits beside the axes (inside, it hid points), and the length axis ticks whole tokens
    (lengths of 3 to 6 tokens had ticks at 3.5, 4.5)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from support import report as report_files
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=20), rng.normal(size=20)
    lengths = rng.integers(3, 7, size=20)
    report_files.save_plots(tmp_path, chosen, rejected, lengths, lengths[::-1])
    fig = figures[-1]
    ax, = fig.axes
    assert ax.get_title() == "Reward vs response length"
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes: no point is under it
