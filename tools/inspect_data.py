"""Stream a preference data source and report what was read, skipped and kept, and the peak memory growth.

    python -m tools.inspect_data SOURCE [--split test] [--max_samples N]
    python -m tools.inspect_data SOURCE --model DIR [--max_length 1024] [--show N]
    python -m tools.inspect_data SOURCE... --audit [--eval SOURCE...] [--benchmark PATH...] [--json FILE]

SOURCE is what train.py's --dataset takes (demo, demo_ranked, a Hub dataset id, a local file, directory or
glob). A ranked source (UltraFeedback, Nectar, plain prompt/responses/scores|ranks: support/ranked.py) is
read as groups: `kept` counts groups, and --show prints each response with its level (higher is better).
With --model, every pair is tokenised as training would (max_length cuts prompts from the left and drops
pairs whose response does not fit: counted) and --show N prints the first N pairs as the model reads
them, with their token counts. What the tokenizer is given is bounded (Tokenizer.char_cap), and a shown
text over SHOW_CHARS characters is elided in its middle, so a 12 MB row costs neither memory nor a
terminal full of text.
--audit also checks the data (support/audit.py): duplicate and contradicting pairs, repeated prompts, the
--eval held-out pairs that also occur in training, training prompts sharing a 13-gram with a --benchmark
file's prompts, and the share of pairs a "longer is better" rule gets right; a table, and with --json FILE
the report with a few examples of each finding.
"""
import itertools
import json
from pathlib import Path

import data
from support import audit, chat, ranked
from support import report as report_files
from support.errors import ArgumentParser, UserError, run_cli
from support.tokenizer import Tokenizer

SHOW_CHARS = 2000  # a shown text keeps its first and last SHOW_CHARS // 2 characters


def rss_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise UserError(f"can't read {key} from /proc/self/status; memory reporting needs Linux")


def reset_peak_rss():
    """Reset the peak RSS counter (Linux >= 4.0) so that VmHWM measures only the reading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m tools.inspect_data", description="Stream a preference data source; print what was read, "
                                        "skipped and kept, and the peak memory growth.")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="demo, a Hub dataset id, or a local file/directory/glob (several: read in turn)")
    parser.add_argument("--split", default="train", help="train or test (default: train)")
    parser.add_argument("--max_samples", "--max-samples", type=int, default=None,
                        help="stop after this many pairs (as train.py's --max_samples)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a model directory: its tokenizer counts tokens and its chat template renders "
                             "conversational rows")
    parser.add_argument("--max_length", type=int, default=1024,
                        help="with --model: tokens per sequence, as train.py's --max_length (default: 1024)")
    parser.add_argument("--chat_template", default="auto", metavar="auto|none|PATH",
                        help="conversational rows: auto (the --model's template), none, or a .jinja file")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N pairs as the model reads them: prompt, chosen, rejected texts")
    parser.add_argument("--audit", action="store_true",
                        help="check the data: duplicates, contradictions, held-out overlap, contamination, length")
    parser.add_argument("--eval", nargs="+", default=None, metavar="SOURCE",
                        help="with --audit: held-out sources whose overlap with the training sources is counted")
    parser.add_argument("--eval_split", default="test", help="with --eval: their split (default: test)")
    parser.add_argument("--benchmark", nargs="+", default=None, metavar="PATH",
                        help="with --audit: local RewardBench, RewardBench 2 or RM-Bench files; training prompts "
                             "sharing a 13-gram of words with their prompts are counted")
    parser.add_argument("--json", default=None, metavar="FILE", help="with --audit: write the report there")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tok = Tokenizer.from_dir(args.model) if args.model else None
    if tok is not None:
        chat_format = tok.chat_format(args.chat_template)
    else:
        template = None if args.chat_template in ("auto", "none") else chat.load_chat_template(None, args.chat_template)
        chat_format = chat.ChatFormat(template, why_none="none was given; pass --model DIR or --chat_template PATH")
    chat_format.count_missing = True  # a conversation without a template is counted (below), not the end of the report
    if not args.audit and (args.eval or args.benchmark or args.json):
        raise UserError("--eval, --benchmark and --json are --audit's options; add --audit")
    if args.json:
        check_json_output(Path(args.json))
    # the benchmarks' 13-gram index, built once, before the reading whose memory is measured
    checks = audit.Audit(audit.load_benchmarks(args.benchmark) if args.benchmark else None) if args.audit else None
    import pyarrow.parquet  # noqa: F401 (loaded now, not while reading: the growth is the reading's)
    reset_peak_rss()
    before = rss_mib("VmRSS")
    stats = data.DataStats()
    grouped = ranked.is_ranked(args.sources, args.split)
    rows = ranked.iter_groups if grouped else data.iter_pairs
    for n, pair in enumerate(itertools.chain.from_iterable(
            [rows(s, args.split, stats, chat_format) for s in args.sources]), 1):
        if grouped:
            items = ranked.tokenize_groups([pair], tok, args.max_length, stats) if tok is not None else []
            if n <= args.show:
                show_group(n, pair, tok, items[0] if items else None, args.max_length)
        else:
            item = data.tokenize_pair(tok, pair, args.max_length, stats) if tok is not None else None
            if n <= args.show:
                show_pair(n, pair, tok, item, args.max_length)
        if checks is not None:  # a group's lengths are compared in characters
            checks.add(pair, None if tok is None or grouped else response_tokens(tok, pair, item, args.max_length))
        if args.max_samples is not None and n >= args.max_samples:
            break
    report = stats.report()
    if tok is None:  # nothing was tokenised: say so instead of counting zeros
        for key in ("tokenized", "truncated_prompt", "dropped_too_long", "dropped_responses"):
            report.pop(key)
    elif not grouped:
        report.pop("dropped_responses")
    if checks is not None:
        found = run_audit(checks, args, stats, chat_format)
    print(json.dumps(report, indent=1))
    print(f"peak RSS growth while reading: {rss_mib('VmHWM') - before:.1f} MiB")
    if missing := stats.skipped.get(chat.NO_TEMPLATE):
        print(f"{missing:,} conversational row{'s' * (missing != 1)} skipped: they need a chat template, but "
              f"{chat_format.why_none}")
    if checks is not None:
        print(audit_table(found, args.json))
        return found


def response_tokens(tok: Tokenizer, pair: data.Pair, item: data.TokenizedPair | None, max_length: int):
    """(chosen, rejected) response tokens: as training tokenised them, or, for a pair too long to train on,
    each response alone (cut to what max_length could ever use)."""
    if item is not None:
        return item.chosen_response_len, item.rejected_response_len
    cap = tok.char_cap(max_length)
    return tuple(len(enc.ids) for enc in tok.encode_batch([pair.chosen[:cap], pair.rejected[:cap]]))


def run_audit(checks: audit.Audit, args, stats: data.DataStats, chat_format) -> dict:
    """The --eval pairs checked against the training pairs, and the report, written to --json first."""
    if args.eval:
        held_stats = data.DataStats()
        rows = ranked.iter_groups if ranked.is_ranked(args.eval, args.eval_split) else data.iter_pairs
        for source in args.eval:
            for pair in rows(source, args.eval_split, held_stats, chat_format):
                checks.add_held_out(pair)
    found = checks.report(stats.read, held_out=bool(args.eval))
    if args.json:
        report_files.write_report(Path(args.json), found)
    return found


def check_json_output(path: Path):
    """--json replaces only an audit report of its own (a typo must not overwrite data), checked before reading."""
    if path.is_dir() or path.exists() and not (path.is_file() and path.stat().st_size < 64 << 20
                                               and '"duplicate_pairs"' in path.read_text(errors="replace")):
        raise UserError(f"--json {path} exists and is not an audit report (--audit replaces only its own); "
                        "choose another --json FILE")


def audit_table(found: dict, json_file: str | None) -> str:
    """The audit report as a few aligned lines."""
    pairs = found["pairs"]

    def share(n):
        return f"{n:>9,}  ({n / pairs:.2%} of the pairs)" if pairs else f"{n:>9,}"
    lines = [f"audit: {found['rows']:,} rows read, {pairs:,} pairs",
             f"  duplicate pairs      {share(found['duplicate_pairs'])}",
             f"  conflicting pairs    {share(found['conflicting_pairs'])}  (the reverse of an earlier pair)",
             f"  duplicate prompts    {share(found['duplicate_prompts'])}  (an earlier prompt, other responses)"]
    if found["train_eval_overlap"] is not None:
        overlap, held = found["train_eval_overlap"], found["held_out_pairs"]
        lines.append(f"  held-out pairs       {held:>9,}  of which {overlap['pairs']:,} are training pairs and "
                     f"{overlap['prompts']:,} have a training prompt")
    for name, n in found["contaminated"].items():
        lines.append(f"  contaminated         {share(n)}  (a prompt shares a 13-gram with {name})")
    if found["length"] is not None:
        lines.append(f"  longer is better     {found['length']:>9.2%}  of the pairs have the longer chosen response "
                     f"({found['length_unit']})")
    lines.append(f"examples of each finding: in {json_file}" if json_file else "examples: pass --json FILE")
    return "\n".join(lines)


def shown(text: str) -> str:
    """repr of the text (newlines and special tokens show), its middle elided past SHOW_CHARS."""
    if len(text) <= SHOW_CHARS:
        return repr(text)
    half = SHOW_CHARS // 2
    return f"{text[:half]!r} ... ({len(text) - 2 * half:,} characters) ... {text[-half:]!r}"


def show_pair(n: int, pair: data.Pair, tok: Tokenizer | None, item: data.TokenizedPair | None, max_length: int):
    """One pair as the model reads it, with token counts (after max_length's cut) when there is a tokenizer."""
    print(f"--- pair {n} ({pair.source}{'' if pair.margin is None else f', margin {pair.margin}'})")
    if tok is None:
        counts = ("", "", "")
    elif item is None:
        counts = ("", f" (dropped: the longer response does not fit in --max_length {max_length})", "")
    else:
        counts = [f" ({report_files.plural(k, 'token')})" for k in (item.prompt_len, item.chosen_response_len,
                                                                    item.rejected_response_len)]
    for name, text, count in zip(("prompt", "chosen", "rejected"), (pair.prompt, pair.chosen, pair.rejected), counts):
        print(f"{name}{count}: {shown(text)}")
    if not pair.eos:
        print("then: nothing (a chat-template rendering ends as the template says)")
    elif tok is not None:
        print(f"then: {tok.eos_token!r}, unless the text ends with it already or eos == pad")


def show_group(n: int, group: ranked.Group, tok: Tokenizer | None, item: ranked.TokenizedGroup | None,
               max_length: int):
    """One ranked group as the model reads it: the prompt, then each response with its level (and tokens)."""
    print(f"--- group {n} ({group.source}, {len(group.responses)} responses, levels higher is better)")
    if tok is not None and item is None:
        print(f"(dropped: fewer than two levels fit in --max_length {max_length})")
    tokens = "" if item is None else f" ({report_files.plural(item.prompt_len, 'token')})"
    print(f"prompt{tokens}: {shown(group.prompt)}")
    lens = dict(enumerate(item.response_lens)) if item is not None and len(item.ids) == len(group.responses) else {}
    for i, (text, level) in enumerate(zip(group.responses, group.levels)):
        count = f", {report_files.plural(lens[i], 'token')}" if i in lens else ""
        print(f"response {i + 1} (level {level:g}{count}): {shown(text)}")
    if not group.eos:
        print("then: nothing (a chat-template rendering ends as the template says)")
    elif tok is not None:
        print(f"then: {tok.eos_token!r}, unless the text ends with it already or eos == pad")


if __name__ == "__main__":
    run_cli(main)
