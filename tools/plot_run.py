"""Draw a training run's curves from its log.jsonl: what a working run looks like, one command away.

    python -m tools.plot_run OUTPUT_DIR                      # writes OUTPUT_DIR/curves.png
    python -m tools.plot_run OUTPUT_DIR --out demo.png

Two panels against the optimizer step: the training loss, with log 2 = 0.693 marked (where a model whose
rewards are all equal starts), and the accuracy, training and held out, with 0.5 (chance) marked. A
training point is the mean over the `logging_steps` steps before it (train.py's records); a held-out point
is an evaluation every `eval_steps`. docs/training_curves.md shows the demo's picture and says what to
expect. log.jsonl is read line by line with each line's size bounded (support/readers.py); a line that is
not a record (a kill mid-write) is skipped and counted. Needs matplotlib (`pip install matplotlib`).
"""
import math
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

from support import fileio, readers
from support.errors import ArgumentParser, UserError, run_cli


class Curves(NamedTuple):
    train: list     # (step, loss, accuracy): train.py's logging records
    held_out: list  # (step, accuracy): its evaluations on the held-out split
    skipped: int    # lines that are neither (unparsable, cut short, or another kind of record)


def is_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def read_curves(log: Path) -> Curves:
    """The curves in a train.py log.jsonl, in the order logged."""
    train, held_out, skipped = [], [], 0
    for record in readers.json_values(str(log)):
        step = record.get("step") if isinstance(record, dict) else None
        if type(step) is not int:
            skipped += 1
        elif is_number(record.get("loss")) and is_number(record.get("accuracy")):
            train.append((step, record["loss"], record["accuracy"]))
        elif is_number(record.get("eval_accuracy")):
            held_out.append((step, record["eval_accuracy"]))
        else:
            skipped += 1
    return Curves(train, held_out, skipped)


def load(run_dir: Path) -> Curves:
    log = run_dir / "log.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give the --output_dir of a train.py run")
    if not fileio.is_regular_file(log):
        raise UserError(f"{run_dir} has no log.jsonl; give the --output_dir of a train.py run that has logged "
                        "a step (train.py writes a record every --logging_steps steps)")
    curves = read_curves(log)
    if not curves.train:
        raise UserError(f"{log} holds no training record (step, loss, accuracy); plot a run that has logged a "
                        "step")
    return curves


def render(curves: Curves, title: str) -> bytes:
    """The PNG's bytes: loss on the left, accuracy on the right, both against the step."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    steps, loss, accuracy = zip(*curves.train)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, loss, marker=".", label="training loss")
    left.axhline(math.log(2), color="gray", ls="--", lw=1, label="log 2: all rewards equal")
    left.set(xlabel="step", ylabel="pairwise loss", xlim=(0, None), ylim=(0, max(max(loss), math.log(2)) * 1.1))
    left.legend()
    right.plot(steps, accuracy, marker=".", label="training accuracy")
    if curves.held_out:
        right.plot(*zip(*curves.held_out), marker="o", label="held-out accuracy")
    right.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    right.set(xlabel="step", ylabel="accuracy (chosen > rejected)", xlim=(0, None), ylim=(0.4, 1.01))
    right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def summary(curves: Curves, out: Path) -> str:
    (first, *_), (last, loss, accuracy) = curves.train[0], curves.train[-1]
    text = (f"wrote {out}: {len(curves.train)} training records (steps {first}-{last}; last loss {loss:.4f}, "
            f"accuracy {accuracy:.4f}), {len(curves.held_out)} evaluations")
    if curves.held_out:
        text += f" (last held-out accuracy {curves.held_out[-1][1]:.4f} at step {curves.held_out[-1][0]})"
    return text + (f"; {curves.skipped} lines of log.jsonl skipped (not a record)" if curves.skipped else "")


def main(argv=None):
    p = ArgumentParser(prog="-m tools.plot_run", description=__doc__.split("\n")[0])
    p.add_argument("output_dir", help="a train.py --output_dir (it holds log.jsonl)")
    p.add_argument("--out", help="the PNG to write (default: OUTPUT_DIR/curves.png)")
    args = p.parse_args(argv)
    run_dir = Path(args.output_dir)
    out = Path(args.out) if args.out else run_dir / "curves.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the picture is a PNG; give a file name ending in .png")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name ending in .png")
    curves = load(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("tools.plot_run needs matplotlib, which is not installed; pip install matplotlib") from None
    title = run_dir.resolve().name + (": held-out accuracy {1:.3f} at step {0}".format(*curves.held_out[-1])
                                      if curves.held_out else "")
    png = render(curves, title)
    try:
        fileio.write_text_atomic(out, png)  # whole or not at all
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); choose another --out") from None
    print(summary(curves, out))  # after the save (run_cli drops it if stdout's reader has gone)


if __name__ == "__main__":
    run_cli(main)
