"""Where eval.py's report goes, and its plots: file plumbing around the report that eval.py computes.

- report_path: --output, or evaluation_report.json inside it (a directory, or a path ending in /); an
  existing file is replaced only if it is a report (is_report), never weights or a config, and one over
  MAX_REPORT_BYTES is refused there, before any scoring; read_report reads it back under that same limit.
- write_report: the report (and the files that go with it: benchmark_rewards.jsonl) written atomically, all
  or none; a full or read-only disk is one line.
- check_plots: --plots checked before any scoring (a file in the way, not writable, matplotlib missing);
  save_plots: the three PNGs.
- summary: the report as the table eval.py prints (fmt: a number, or n/a for None).
- The words around the numbers, for train.py's `data:` line (data_line), eval.py's table and
  tools.inspect_data: plural ("1 row", "2 rows"), data_counts (what reading and tokenising did, in words:
  data.DataStats.report()), source_rows (the per-source table, aligned however long a path is).
"""
import json
import os
from pathlib import Path

import numpy as np

from support.errors import UserError, check_writable
from support.fileio import read_bounded, write_json_atomic, write_text_atomic

REPORT_NAME = "evaluation_report.json"
MAX_REPORT_BYTES = 64 << 20  # an existing report eval.py replaces or adds to (a real one: a few KB to MB)


def plural(n: int, word: str) -> str:
    """'1 row', '2 rows', '1,024 tokens'."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def data_counts(counts: dict) -> str:
    """data.DataStats.report() in words: '35 rows read, 33 kept, 2 skipped (1 not an object, 1 unparsable
    line), 3 dropped as too long', with the prompts cut and the sources when there are several."""
    parts = [f"{plural(counts['read'], 'row')} read", f"{counts['kept']:,} kept"]
    if counts.get("skipped_total"):
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in counts["skipped"].items())
        parts.append(f"{counts['skipped_total']:,} skipped ({reasons})")
    if counts.get("dropped_too_long"):
        parts.append(f"{counts['dropped_too_long']:,} dropped as too long")
    if counts.get("dropped_responses"):  # ranked groups: a response that alone did not fit
        parts.append(f"{plural(counts['dropped_responses'], 'response')} dropped as too long")
    if counts.get("truncated_prompt"):
        parts.append(f"{plural(counts['truncated_prompt'], 'prompt')} cut from the left")
    if len(counts.get("sources", {})) > 1:
        parts.append("from " + ", ".join(f"{source} {n:,}" for source, n in counts["sources"].items()))
    return ", ".join(parts)


def data_line(n_train: int, n_eval: int, held: str, train_counts: dict, eval_counts: dict) -> str:
    """train.py's `data:` line: the pairs it trains and evaluates on, then what reading each side did."""
    return (f"data: {plural(n_train, 'training pair')}, {plural(n_eval, 'eval pair')}{held} | "
            f"train: {data_counts(train_counts)} | eval: {data_counts(eval_counts)}")


SOURCE_CHARS = 40  # a longer source name (a deep path) is shown as its last SOURCE_CHARS - 1 characters


def source_rows(cells: dict, label_width: int) -> tuple[int, list[str]]:
    """The per-source rows of a table whose other rows' labels are `label_width` wide: (the label width
    that fits every row, the rows "  NAME  CELL"), a name over SOURCE_CHARS shown as '…' and its end."""
    names = {name: (name or "(no source)") if len(name or "") <= SOURCE_CHARS else "…" + name[-(SOURCE_CHARS - 1):]
             for name in cells}
    width = max([label_width] + [2 + len(shown) + 1 for shown in names.values()])
    return width, [f"  {names[name]:<{width - 2}}{cell}" for name, cell in cells.items()]


def report_path(output: str | None, report_dir: Path) -> Path:
    """Where the report goes: --output, or REPORT_NAME inside it when it is a directory or ends with "/".
    An existing file is replaced only if it is an evaluation report: never the weights, a config or
    anything else that --output happened to name."""
    path = Path(output) if output else report_dir / REPORT_NAME
    if output and (output.endswith(("/", os.sep)) or path.is_dir()):
        path = path / REPORT_NAME
    if path.is_file() and path.stat().st_size > MAX_REPORT_BYTES:  # one limit, checked before scoring
        raise UserError(f"--output {path} exists and is {path.stat().st_size / 2**20:.0f} MiB, over the "
                        f"{MAX_REPORT_BYTES >> 20} MiB an evaluation report may have; delete it or choose another "
                        "--output")
    if path.exists() and not is_report(path):
        raise UserError(f"--output {path} exists and is not an evaluation report (eval.py replaces only its own "
                        f"reports); choose another --output")
    return path


def is_report(path: Path) -> bool:
    """A .json file holding an object with a report's keys, as eval.py and train.py write it."""
    try:
        report = read_report(path)
    except UserError:
        return False
    return isinstance(report, dict) and ({"accuracy", "counts", "per_source"} <= report.keys() or "benchmark" in report)


def read_report(path: Path):
    """The JSON value of an existing report file, read under MAX_REPORT_BYTES (the limit report_path checked)."""
    try:
        return json.loads(read_bounded(path, MAX_REPORT_BYTES)) if Path(path).suffix == ".json" else None
    except (ValueError, RecursionError, OSError) as e:
        raise UserError(f"{path}: the existing report can't be read ({e}); delete it or choose another "
                        "--output") from None


def write_report(output: Path, report: dict, files: dict | None = None):
    """The report and the files that go with it ({path: text}), all or none: each file is written whole under
    a hidden name, then the report, then the files are renamed into place. A full or read-only disk (the
    up-front check passed, then scoring filled it) is one line, and leaves no new file behind."""
    staged = {path: path.with_name(f".{path.name}.new-{os.getpid()}") for path in files or {}}
    try:
        for path, text in (files or {}).items():
            write_text_atomic(staged[path], text)
        write_json_atomic(output, report)
        for path, tmp in staged.items():
            os.replace(tmp, path)
    except OSError as e:  # the disk filled up or went read-only while scoring
        raise UserError(f"cannot write the report {output} ({e.strerror}); free space or choose another "
                        "--output") from None
    finally:
        for tmp in staged.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # a read-only disk refuses this too: the first error is the one to tell
                pass


def check_plots(plots: str | None):
    """--plots DIR: a directory (or none yet), and matplotlib installed; checked before minutes of scoring."""
    if plots is None:
        return
    if Path(plots).exists() and not Path(plots).is_dir():
        raise UserError(f"--plots {plots} is a file; give a directory for the PNGs")
    # now, not after scoring and the report: a path under a file, or unwritable, fails here
    check_writable(Path(plots), f"the plots to --plots {plots}", "give a writable directory for the PNGs")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plots needs matplotlib, which is not installed; pip install matplotlib, "
                        "or drop --plots") from None


def save_plots(plot_dir: Path, chosen, rejected, chosen_len, rejected_len) -> list[Path]:
    """Three PNGs: reward histograms (chosen vs rejected), margin histogram, reward vs response length."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=120)
        plt.close(fig)
        paths.append(plot_dir / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)
    ax.hist(chosen, bins=bins, alpha=0.6, label="chosen")
    ax.hist(rejected, bins=bins, alpha=0.6, label="rejected")
    ax.set(xlabel="reward", ylabel="responses", title="Rewards of chosen and rejected responses")
    ax.legend()
    save(fig, "rewards.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(chosen - rejected, bins=40, color="tab:green")
    ax.axvline(0, color="black", lw=1)
    ax.set(xlabel="reward margin (chosen - rejected)", ylabel="pairs", title="Margins: right of 0 is correct")
    save(fig, "margins.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(chosen_len, chosen, s=6, alpha=0.5, label="chosen")
    ax.scatter(rejected_len, rejected, s=6, alpha=0.5, label="rejected")
    ax.set(xlabel="response length (tokens)", ylabel="reward", title="Reward vs response length")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # tokens are whole: no 2.5 ticks
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the axes, hiding no point
    save(fig, "reward_vs_length.png")
    return paths


def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def summary(report: dict) -> str:
    """eval.py's report (eval.report_from_rewards, with the run's information) as the table it prints."""
    def acc(block):
        low, high = block["ci95"]
        return f"{fmt(block['accuracy'])}  [{fmt(low)}, {fmt(high)}]  n={block['num_pairs']}"
    c, m, ln = report["counts"], report["margin"], report["length"]
    overall = {"accuracy": report["accuracy"], "ci95": report["accuracy_ci95"], "num_pairs": report["num_pairs"]}
    split = report["split"] + (f", the held-out {report['eval_fraction']} share" if report.get("eval_fraction") else "")
    lines = [f"evaluated {report['checkpoint']} on {', '.join(report['dataset'])} ({split}): "
             f"{plural(c['evaluated'], 'pair')}, {plural(c['skipped'], 'row')} skipped, "
             f"{c['dropped_too_long']:,} longer than {report['max_length']} tokens dropped"]
    width, by_source = source_rows({name: acc(block) for name, block in report["per_source"].items()}, 28)
    lines += [f"{'accuracy (95% Wilson CI)':<{width}}{acc(overall)}", *by_source,
              f"{'loss (-log sigmoid margin)':<{width}}{fmt(report['loss'], '.4f')}"]
    percentiles = [k for k in report["rewards"]["chosen"] if k.startswith("p")]  # p5 ... p95
    keys = ["mean", "std", "min", *percentiles, "max"]
    lines.append(f"{'rewards':<12}" + "".join(f"{k:>9}" for k in keys))
    for name in ("chosen", "rejected"):
        lines.append(f"  {name:<10}" + "".join(f"{fmt(report['rewards'][name][k]):>9}" for k in keys))
    # the margin has no percentiles: leave their columns empty so max lines up
    lines.append(f"{'margin':<12}" + "".join(f"{fmt(m[k]):>9}" for k in ("mean", "std", "min"))
                 + " " * 9 * len(percentiles) + f"{fmt(m['max']):>9}")
    lines.append(f"  unsure (|margin| < {m['unsure_threshold']}): {fmt(m['unsure_share'], '.1%')} of pairs")
    lines += [f"length bias: corr(reward, response tokens) pearson {fmt(ln['pearson'])}, "
              f"spearman {fmt(ln['spearman'])}",
              f"  chosen longer    {acc(ln['chosen_longer'])}",
              f"  chosen shorter   {acc(ln['chosen_shorter'])}",
              f"  same length      {acc(ln['same_length'])}",
              f"  on the {ln['num_different_length']} pairs of different length: "
              f"model {fmt(ln['model_accuracy_on_different_length'])}, "
              f"\"longer is better\" rule {fmt(ln['longer_is_better_accuracy'])}"]
    if (r := report.get("ranking")) is not None:  # ranked groups (support/ranked.py): accuracy is over their pairs
        low, high = r["pairwise_accuracy_ci95"]
        lines.append(f"ranking: {plural(r['groups'], 'group')}, {plural(r['pairs'], 'ordered pair')}: pairwise "
                     f"accuracy {fmt(r['pairwise_accuracy'])} [{fmt(low)}, {fmt(high)}], top-1 "
                     f"{fmt(r['top1_accuracy'])}, Kendall tau-b {fmt(r['kendall_tau'])}")
    return "\n".join(lines)
