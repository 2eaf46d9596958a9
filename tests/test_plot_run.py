"""tools/plot_run.py: a run's curves from its log.jsonl, read as train.py writes it, drawn into a PNG."""
import json
import os
import sys
from dataclasses import replace

import pytest
import torch

from support.errors import UserError
from tools import plot_run, walkthrough
from train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_the_curves_a_real_run_logged(tmp_path, capsys):
    """A short demo run through train(): every training and evaluation record it logged is a point, and the
    summary's last held-out accuracy is the run's own."""
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    try:
        cfg = replace(walkthrough.demo_config(), max_steps=4, logging_steps=2, eval_steps=2, save_steps=1000,
                      max_train_samples=64, max_eval_samples=16, output_dir=str(tmp_path / "run"), progress=False)
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    curves = plot_run.read_curves(tmp_path / "run" / "log.jsonl")
    assert [s for s, _, _ in curves.train] == [r["step"] for r in records if "loss" in r] == [2, 4]
    assert curves.held_out == [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    assert [s for s, _ in curves.held_out] == [2, 4] and curves.skipped == 0
    plot_run.main([str(tmp_path / "run")])
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(PNG_MAGIC)
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'run' / 'curves.png'}: 2 training records (steps 2-4")
    assert f"last held-out accuracy {curves.held_out[-1][1]:.4f} at step 4" in out


def test_lines_that_are_not_records_are_skipped_and_counted(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 50, "loss": 0.6, "accuracy": 0.73}, {"step": 50, "eval_accuracy": 0.8, "eval_loss": 0.5},
             {"step": 100, "loss": 0.4, "accuracy": 0.75}, ["not", "a", "record"], {"step": "100", "loss": 1.0}]
    (run / "log.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 150, "loss": 0.3')  # cut by a kill
    curves = plot_run.read_curves(run / "log.jsonl")
    assert curves == plot_run.Curves([(50, 0.6, 0.73), (100, 0.4, 0.75)], [(50, 0.8)], 3)
    plot_run.main([str(run), "--out", str(tmp_path / "pictures" / "demo.png")])
    assert (tmp_path / "pictures" / "demo.png").read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.rstrip().endswith("; 3 lines of log.jsonl skipped (not a record)")


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory; give the --output_dir of a train.py run"),
    ("no log", "has no log.jsonl"),
    ("only evaluations", "holds no training record"),
    ("fifo", r"log.jsonl is a named pipe \(FIFO\), not a regular file"),
    ("not png", "the picture is a PNG"),
])
def test_mistakes_are_one_line_and_nothing_is_written(tmp_path, case, message):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case in ("only evaluations", "not png"):
        (run / "log.jsonl").write_text(json.dumps({"step": 2, "eval_accuracy": 0.5}) + "\n")
    if case == "fifo":
        os.mkfifo(run / "log.jsonl")
    argv = [str(run)] + (["--out", str(tmp_path / "curves.jpg")] if case == "not png" else [])
    with pytest.raises(UserError, match=message):
        plot_run.main(argv)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.jpg"))


def test_without_matplotlib_one_line_names_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 2, "loss": 0.6, "accuracy": 0.5}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UserError, match="needs matplotlib, which is not installed; pip install matplotlib"):
        plot_run.main([str(run)])
    assert not (run / "curves.png").exists()
