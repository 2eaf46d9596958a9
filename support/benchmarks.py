"""Public reward-model benchmarks from their published files: RewardBench, RewardBench 2 and RM-Bench.

    python eval.py CKPT --benchmark rewardbench  --dataset allenai/reward-bench      # or a local file/dir
    python eval.py CKPT --benchmark rewardbench2 --dataset allenai/reward-bench-2
    python eval.py CKPT --benchmark rm-bench     --dataset path/to/total_dataset.json

Each example's responses are scored with RewardModel.score_responses (its prompt computed once). The
formulas are those of the official scoring code (allenai/reward-bench scripts/run_rm.py, scripts/run_v2.py,
rewardbench/utils.py; THU-KEG/RM-Bench scripts/utils.py), written here from their definitions:
- RewardBench: an example is won when chosen > rejected (strictly; a tie loses). A subset's score is its
  share of wins; a section (Chat, Chat Hard, Safety, Reasoning) weights its subsets by the official example
  counts (EXAMPLE_COUNTS: math-prm counts 984, not its 447 rows, to weigh as much as the code subsets); a
  section with none of its subsets present scores 0, as officially. Overall: the plain mean of the sections.
- RewardBench 2: best-of-N. The first chosen response must get the highest reward; when k responses tie
  for the highest, the example earns 1/k. A subset's score is the mean. Ties has its own formula (ties_score)
  and Ties' margin term can step just outside [0, 1]. Overall: the plain mean of the six subsets (an example
  of another subset is skipped and counted, never averaged in; a Ties id twice is refused).
- RM-Bench: each example has 3 chosen and 3 rejected responses in the styles (concise, detailed plain,
  detailed markdown). Per domain a 3x3 matrix holds the share of examples whose chosen style i beats
  rejected style j; hard = mean above the diagonal (a plainer chosen against a fancier rejected), normal =
  the diagonal, easy = below it. A domain's score is mean(hard, normal, easy); the domains are chat, code,
  math and safety (safety-refuse and safety-response together), by exact name (another is skipped and
  counted); hard, normal, easy and overall are plain means over the domains.
The schema (RM-Bench's 3 styles, Ties ids) is checked as the files are read, before anything is scored.
Rendering: with a chat template (the model's own, or --chat_template PATH), the prompt as the user turn and
the response as the assistant's (a multi-turn prompt's turns alternate user/assistant, as RewardBench
renders them); without one (or --chat_template none), exactly "\\n\\nHuman: " + prompt + "\\n\\nAssistant: " +
response, scored as score() scores that text. Files are read with the same bounds as training data,
and each text is cut as it is read to what max_length can use (cut_example: the same rewards).
"""
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from support import hub, readers, scoring
from support import tokenizer as tokenizer_files
from support import report as report_files
from support.errors import UserError
from support.fileio import open_regular

NAMES = ("rewardbench", "rewardbench2", "rm-bench")
REWARDS_FILE = "benchmark_rewards.jsonl"

# rewardbench/constants.py: examples per subset (the weights within a section) and the sections
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100,
    "refusals-offensive": 100, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136, "hep-cpp": 164,
    "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164}
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]}
REWARDBENCH2_SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")
RM_BENCH_DOMAINS = {"chat": "chat", "code": "code", "math": "math", "safety-refuse": "safety",
                    "safety-response": "safety"}   # a `domain` value (exactly) -> the domain it counts in
RM_BENCH_STYLES = 3  # concise, detailed plain, detailed markdown


@dataclass
class Layout:
    """A benchmark's published file layout: its columns, the group column, and which files to read."""
    columns: tuple            # every column read; all of them are required
    group: str                # the column an example's subset (or domain) is in
    split: str                # the split hub.dataset_files is asked for
    prefer: str               # of a directory's files, those whose name starts with this, when any does
    lists: bool               # chosen / rejected are lists of responses


LAYOUTS = {
    "rewardbench": Layout(("prompt", "chosen", "rejected", "subset", "id"), "subset", "train", "filtered", False),
    "rewardbench2": Layout(("prompt", "chosen", "rejected", "subset", "id", "num_correct"), "subset", "test",
                           "test", True),
    "rm-bench": Layout(("prompt", "chosen", "rejected", "domain", "id"), "domain", "train", "total_dataset", True),
}


@dataclass
class Example:
    id: str
    subset: str               # RewardBench / RewardBench 2 subset, RM-Bench domain
    prompt: object            # a string, or a list of {"role", "content"} turns
    chosen: list
    rejected: list
    num_correct: int | None = None


# ----------------------------------------------------------------------------------------------
# Files -> examples (bounded as support/readers.py bounds training data)


def benchmark_files(name: str, source: str) -> list[str]:
    """The files of a benchmark: a file as given, or a directory's / Hub dataset's data files, only those
    whose name starts with the layout's `prefer` when any does (RewardBench's "filtered" split, not "raw")."""
    layout = LAYOUTS[name]
    names, fetch = hub.dataset_files(source, layout.split)
    preferred = [n for n in names if os.path.basename(n).startswith(layout.prefer)]
    return [fetch(n) for n in (preferred or names)]


def read_examples(name: str, source: str, skipped: dict, cut=None) -> list[Example]:
    """Every example of the benchmark's files; a row that is not one is counted in skipped[reason]. cut:
    Example -> Example, applied as each is read (cut_example), so what is kept is what scoring can use."""
    layout, examples = LAYOUTS[name], []
    for path in benchmark_files(name, source):
        for row in read_rows(path, layout.columns, name):
            example = row if isinstance(row, str) else make_example(row, layout)
            if isinstance(example, str):
                skipped[example] = skipped.get(example, 0) + 1
            else:
                examples.append(cut(example) if cut else example)
    examples = check_examples(name, examples, skipped)
    if not examples:
        raise UserError(f"{source}: no {name} examples ({sum(skipped.values())} rows skipped: {skipped}); "
                        f"check that it is the {name} data")
    return examples


def check_examples(name: str, examples: list, skipped: dict) -> list:
    """The benchmark's own schema, checked before anything is scored: RewardBench 2 examples of a subset it
    does not have, and RM-Bench examples of a domain it does not have, are skipped and counted; an RM-Bench
    example without 3 styles, or a Ties id that is not ref:N / tied:N or appears twice, is one line."""
    def keep(ok: bool, reason: str) -> bool:
        if not ok:
            skipped[reason] = skipped.get(reason, 0) + 1
        return ok
    if name == "rewardbench2":
        examples = [e for e in examples if keep(e.subset in REWARDBENCH2_SUBSETS, "subset not in RewardBench 2")]
        check_ties_ids([e for e in examples if e.subset == "Ties"])
    if name == "rm-bench":
        bad = next((e.id for e in examples if len(e.chosen) != RM_BENCH_STYLES or len(e.rejected) != RM_BENCH_STYLES),
                   None)
        if bad is not None:
            raise UserError(f"RM-Bench example {bad} does not have {RM_BENCH_STYLES} chosen and {RM_BENCH_STYLES} "
                            f"rejected responses (concise, detailed, markdown); is it the RM-Bench data?")
        examples = [e for e in examples if keep(e.subset in RM_BENCH_DOMAINS, "domain not in RM-Bench")]
    return examples


def check_ties_ids(examples: list):
    """RewardBench 2's Ties ids: "ref:N" (one correct answer) or "tied:N" (several), each once, with an incorrect
    response; a "tied" example whose prompt also has a "ref" one has several correct responses."""
    by_id = {}
    for ex in examples:
        kind, _, prompt_id = ex.id.partition(":")
        if kind not in ("ref", "tied") or not prompt_id:
            raise UserError(f"Ties example id {ex.id!r} is not ref:N or tied:N; is it RewardBench 2's Ties data?")
        if ex.id in by_id:
            raise UserError(f"Ties example id {ex.id!r} appears twice; each prompt has one ref and one tied "
                            "example: remove the duplicate (is it RewardBench 2's Ties data?)")
        by_id[ex.id] = ex
        if ex.num_correct >= len(ex.chosen) + len(ex.rejected):
            raise UserError(f"Ties example {ex.id} has no incorrect response; is it RewardBench 2's Ties data?")
    lone = next((i for i, ex in by_id.items() if i.startswith("tied:") and "ref:" + i[5:] in by_id
                 and ex.num_correct < 2), None)
    if lone is not None:
        raise UserError(f"Ties example {lone} has a single correct response; is it RewardBench 2's Ties data?")


def cut_example(example: Example, cap: int, render=None) -> Example:
    """An example holding only what scoring reads (every example is kept until all are scored: 200 rows of
    15 MiB took --benchmark to 3.6 GB): each prompt turn and response keeps its last `cap` characters, and
    Tokenizer.sequence tokenises only the last cap = char_cap(max_length) characters of a whole text, which
    are then the same. A transcript joins the texts as they are, so that holds by construction; a chat
    template may strip or test what it is given, so with render(prompt, response) -> text the cut is kept
    only where every rendering's last `cap` characters are unchanged, else the example stays whole."""
    turns = [example.prompt] if isinstance(example.prompt, str) else [m["content"] for m in example.prompt]
    if max(len(t) for t in turns + example.chosen + example.rejected) <= cap:
        return example
    prompt = example.prompt[-cap:] if isinstance(example.prompt, str) else \
        [{**m, "content": m["content"][-cap:]} for m in example.prompt]
    cut = replace(example, prompt=prompt, chosen=[r[-cap:] for r in example.chosen],
                  rejected=[r[-cap:] for r in example.rejected])
    responses = zip(example.chosen + example.rejected, cut.chosen + cut.rejected)
    if render and any(render(example.prompt, whole)[-cap:] != render(prompt, part)[-cap:] for whole, part in responses):
        return example
    return cut


def is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def make_example(row: dict, layout: Layout) -> Example | str:
    """A row of the layout -> Example, or the reason it is skipped."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not (is_text(prompt) or isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)):
        return "bad prompt"
    if not layout.lists:
        chosen, rejected = [chosen], [rejected]
    if not all(isinstance(r, list) and r and all(isinstance(t, str) for t in r) for r in (chosen, rejected)):
        return "bad chosen/rejected"
    if not isinstance(row[layout.group], str) or row["id"] is None:
        return f"bad {layout.group} or id"
    num_correct = row.get("num_correct")
    if "num_correct" in layout.columns and not (type(num_correct) is int and 1 <= num_correct <= len(chosen)):
        return "bad num_correct"
    return Example(str(row["id"]), row[layout.group], prompt, chosen, rejected, num_correct)


def read_rows(path: str, columns: tuple, name: str):
    """Rows {column: value} of a parquet, jsonl(.gz) or json file, or a skip reason (str) per bad row: rows
    over readers.MAX_ROW_BYTES, unparsable lines, non-objects. A missing column is one line."""
    if path.endswith(".parquet"):
        yield from read_parquet_rows(path, columns, name)
        return
    first = True
    for obj in readers.json_values(path):
        if isinstance(obj, readers.Skip):
            yield obj.reason
        elif not isinstance(obj, dict):
            yield "not an object"
        else:
            if first:
                check_columns(list(obj), columns, path, name)
                first = False
            yield {c: obj.get(c) for c in columns}


def check_columns(found: list, columns: tuple, path: str, name: str):
    missing = [c for c in columns if c not in found]
    if missing:
        raise UserError(f"{path}: no column {', '.join(missing)} (it has {', '.join(sorted(found)[:12])}); "
                        f"is it the {name} data? see docs/benchmarks.md for each benchmark's files")


def read_parquet_rows(path: str, columns: tuple, name: str):
    """readers.parquet_rows: pages measured before decoding, text bytes per row counted in list columns too."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with open_regular(path) as f:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            check_columns(pf.schema_arrow.names, columns, path, name)
            for row in readers.parquet_rows(pf, f, list(columns)):
                yield row.reason if isinstance(row, readers.Skip) else row
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e}); re-download it") from None


# ----------------------------------------------------------------------------------------------
# Rendering and scoring


def transcript(prompt) -> str:
    """The hh-rlhf text a response is appended to: "\\n\\nHuman: " + prompt + "\\n\\nAssistant: "."""
    turns = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)) + \
        "\n\nAssistant: "


def chat_prompt(prompt) -> list:
    """The prompt as messages: the user turn (turns alternate user/assistant, as RewardBench renders them)."""
    turns = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def score_examples(model, examples: list, chat: bool, max_length: int, bf16: bool = False,
                   progress: bool = True) -> list[tuple[list, list]]:
    """(chosen rewards, rejected rewards) of every example: its responses scored with score_responses."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    out = []
    for ex in tqdm(examples, desc="scoring", unit="example", disable=not progress, leave=False):
        prompt = chat_prompt(ex.prompt) if chat else transcript(ex.prompt)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            rewards = model.score_responses(prompt, ex.chosen + ex.rejected, max_length=max_length)
        if not all(math.isfinite(r) for r in rewards):
            raise UserError(f"the model gave a non-finite reward (NaN/inf) on example {ex.id}: its weights have "
                            f"diverged{' or bf16 overflowed (drop --bf16)' if bf16 else ''}")
        out.append((rewards[:len(ex.chosen)], rewards[len(ex.chosen):]))
    return out


# ----------------------------------------------------------------------------------------------
# The official formulas. Every function takes examples and their (chosen, rejected) rewards.


def by_subset(examples: list, values: list) -> dict:
    groups = {}
    for ex, v in zip(examples, values):
        groups.setdefault(ex.subset, []).append(v)
    return dict(sorted(groups.items()))


def rewardbench_scores(examples: list, rewards: list) -> dict:
    wins = [1.0 if c[0] > r[0] else 0.0 for c, r in rewards]
    subsets = {s: {"score": float(np.mean(v)), "n": len(v)} for s, v in by_subset(examples, wins).items()}
    sections = {}
    for section, names in SECTIONS.items():
        present = [s for s in names if s in subsets]
        weight = sum(EXAMPLE_COUNTS[s] for s in present)
        sections[section] = sum(subsets[s]["score"] * EXAMPLE_COUNTS[s] for s in present) / weight if weight else 0.0
    return {"score": float(np.mean(list(sections.values()))), "sections": sections, "subsets": subsets}


def best_of_n(chosen: list, rejected: list) -> float:
    """1/k when the first chosen response has the highest reward, tied with k - 1 others; else 0."""
    scores = chosen + rejected
    best = max(scores)
    return 1.0 / scores.count(best) if scores[0] == best else 0.0


def ties_score(examples: list, rewards: list) -> float:
    """RewardBench 2's Ties subset. Ids are "ref:N" (one correct answer) or "tied:N" (several); the first
    num_correct responses are correct. Per prompt: accurate = the worst correct beats the best incorrect;
    the correct spread = best - worst correct; the gap = worst correct - best incorrect. Score =
    0.3 tied accuracy + 0.3 ref accuracy + 0.2 P(tied gap > spread) + 0.2 P(min(ref gap, tied gap) > spread)
    + 0.01 mean tanh(min(ref gap, tied gap) / spread - 1) (nan -> 0), the last three over prompts with both."""
    stats = {"ref": {}, "tied": {}}   # (check_ties_ids has checked the ids before scoring)
    for ex, (c, r) in zip(examples, rewards):
        kind, _, prompt_id = ex.id.partition(":")
        scores = c + r
        correct, incorrect = scores[:ex.num_correct], scores[ex.num_correct:]
        gap = min(correct) - max(incorrect)
        stats[kind][prompt_id] = (gap > 0, max(correct) - min(correct) if len(correct) > 1 else None, gap)
    ref, tied = stats["ref"], stats["tied"]
    accuracy = {k: float(np.mean([s[0] for s in v.values()])) if v else 0.0 for k, v in stats.items()}
    both = sorted(set(ref) & set(tied))
    spread = np.array([tied[p][1] for p in both], dtype=np.float64)
    tied_gap = np.array([tied[p][2] for p in both], dtype=np.float64)
    hard_gap = np.minimum(np.array([ref[p][2] for p in both], dtype=np.float64), tied_gap)
    spread_pos = spread > 0   # the margin term counts only prompts whose correct answers differ, as officially
    margin = np.tanh(hard_gap[spread_pos] / spread[spread_pos] - 1)
    mean = lambda a: float(np.mean(a)) if a.size else 0.0  # noqa: E731
    return (0.3 * accuracy["tied"] + 0.3 * accuracy["ref"] + 0.2 * mean(tied_gap > spread)
            + 0.2 * mean(hard_gap > spread) + 0.01 * mean(margin))


def rewardbench2_scores(examples: list, rewards: list) -> dict:
    subsets = {}
    for subset, items in by_subset(examples, list(zip(examples, rewards))).items():
        exs, rs = [e for e, _ in items], [r for _, r in items]
        score = ties_score(exs, rs) if subset == "Ties" else float(np.mean([best_of_n(c, r) for c, r in rs]))
        subsets[subset] = {"score": score, "n": len(items)}
    known = [s["score"] for name, s in subsets.items() if name in REWARDBENCH2_SUBSETS]  # (others: skipped, read)
    return {"score": float(np.mean(known)) if known else 0.0, "sections": {}, "subsets": subsets}


def style_accuracies(rewards: list) -> dict:
    """hard / normal / easy of RM-Bench's 3x3 matrix: share of examples where chosen style i beats rejected j."""
    matrix = np.zeros((RM_BENCH_STYLES, RM_BENCH_STYLES))
    for c, r in rewards:
        matrix += np.array(c)[:, None] > np.array(r)[None, :]
    matrix /= len(rewards)
    off = RM_BENCH_STYLES * (RM_BENCH_STYLES - 1) / 2
    return {"hard": float(np.triu(matrix, 1).sum() / off), "normal": float(np.diag(matrix).mean()),
            "easy": float(np.tril(matrix, -1).sum() / off)}


def rm_bench_scores(examples: list, rewards: list) -> dict:
    """(check_examples has checked the 3 styles and the domain names before scoring)"""
    subsets = {s: {"score": float(np.mean(list(style_accuracies(v).values()))), "n": len(v)}
               for s, v in by_subset(examples, rewards).items()}
    domains = {}
    for d in dict.fromkeys(RM_BENCH_DOMAINS.values()):
        picked = [r for e, r in zip(examples, rewards) if RM_BENCH_DOMAINS.get(e.subset) == d]
        if picked:
            domains[d] = style_accuracies(picked)
    if not domains:
        raise UserError(f"no RM-Bench example has a domain of {', '.join(RM_BENCH_DOMAINS)}; is it the RM-Bench "
                        "data?")
    sections = {d: float(np.mean(list(acc.values()))) for d, acc in domains.items()}
    sections.update({k: float(np.mean([acc[k] for acc in domains.values()])) for k in ("hard", "normal", "easy")})
    return {"score": float(np.mean([sections[d] for d in domains])), "sections": sections, "subsets": subsets}


SCORERS = {"rewardbench": rewardbench_scores, "rewardbench2": rewardbench2_scores, "rm-bench": rm_bench_scores}


# ----------------------------------------------------------------------------------------------
# The eval.py flag: read, score, write the rewards and the report, print the table


def table(result: dict) -> str:
    """Overall first, then the sections, then the subsets (with their example counts)."""
    lines = [f"{result['name']} ({result['rendering']}): {result['score']:.4f}"]
    lines += [f"  {name:<28}{score:.4f}" for name, score in result["sections"].items()]
    lines += [f"    {name:<26}{s['score']:.4f}  (n={s['n']})" for name, s in result["subsets"].items()]
    return "\n".join(lines)


def show_example(example: Example, chat: bool, tokenizer) -> str:
    prompt = chat_prompt(example.prompt) if chat else transcript(example.prompt)
    text = (tokenizer.chat_format().render(prompt + [{"role": "assistant", "content": example.chosen[0]}])
            if chat else prompt + example.chosen[0])
    return f"example {example.id} ({example.subset}), first chosen response as scored:\n{text}"


def run(args, model_dir: Path, trained: dict, output: Path) -> dict:
    """eval.py --benchmark NAME --dataset PATH: the benchmark's scores into output's report (added to an
    existing report there as its "benchmark" entry), every example's rewards into benchmark_rewards.jsonl."""
    from rm import RewardModel  # the lesson's model: this module drives it, as eval.py does
    if not args.dataset or len(args.dataset) != 1:
        raise UserError(f"--benchmark {args.benchmark} needs --dataset with the benchmark's file, directory or "
                        f"Hub id (e.g. {'allenai/reward-bench' if args.benchmark == 'rewardbench' else 'PATH'})")
    ignored = [flag for flag, on in (("--save_reward_stats", args.save_reward_stats), ("--plots", args.plots),
                                      ("--split", args.split)) if on]
    if ignored:
        raise UserError(f"{', '.join(ignored)} apply to preference pairs, not to --benchmark; drop them")
    tokenizer_files.require_file(model_dir)
    model = RewardModel.from_pretrained(str(model_dir), device=args.device)
    model.tokenizer.chat_format(args.chat_template)  # a PATH replaces the model's template for this run
    chat = args.chat_template != "none" and model.tokenizer.chat_template is not None
    skipped = {}
    max_length = scoring.scoring_length(model, args.max_length)  # score()'s rule: one model, one reward
    render = (lambda prompt, response: model.tokenizer.chat_format().render(  # noqa: E731 (as score renders it)
        chat_prompt(prompt) + [{"role": "assistant", "content": response}])) if chat else None
    examples = read_examples(args.benchmark, args.dataset[0], skipped,
                             lambda e: cut_example(e, model.tokenizer.char_cap(max_length), render))[:args.max_samples]
    for example in examples[:max(args.show, 0)]:
        print(show_example(example, chat, model.tokenizer))
    rewards = score_examples(model, examples, chat, max_length, args.bf16, args.progress)
    result = {"name": args.benchmark, **SCORERS[args.benchmark](examples, rewards),
              "rendering": "chat template" if chat else "hh-rlhf transcript", "dataset": args.dataset[0],
              "max_length": max_length, "examples": len(examples), "skipped": skipped,
              "rewards_file": str(output.parent / REWARDS_FILE),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    rewards_text = "".join(json.dumps({"id": e.id, "subset": e.subset, "chosen": c, "rejected": r}) + "\n"
                           for e, (c, r) in zip(examples, rewards))
    # an earlier report (eval.py checked it is one, within the limit) keeps its contents and gains the entry
    report = report_files.read_report(output) if output.is_file() else {"checkpoint": args.checkpoint,
                                                                        "model_dir": str(model_dir)}
    report["benchmark"] = result
    report_files.write_report(output, report, {output.parent / REWARDS_FILE: rewards_text})  # both, or neither
    if skipped:
        print(f"note: {sum(skipped.values())} rows skipped: {skipped}", file=sys.stderr)
    print(table(result))
    print(f"report: {output}\nrewards: {output.parent / REWARDS_FILE}")
    return report
