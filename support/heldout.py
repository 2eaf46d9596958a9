"""Which pairs a reward model is evaluated on: one plan, shared by train.py (while training) and eval.py
(afterwards, by default the very same pairs).

- Plan(sources, split, fraction): the held-out pairs are `split` of `sources`, or, with a fraction, that share
  of the training pairs, picked by a hash of each pair's content (data.split_held_out), none of them
  trained on.
- plan_training(...): train.py's plan. A held-out share is the default when --eval_dataset/--eval_split name
  the very files training reads (a local file has no splits); evaluation data that merely overlaps the
  training files is refused. The plan is returned, never written into the configuration.
- plan_evaluation(...): eval.py's plan: a model trained with a held-out share is evaluated on that share
  unless --dataset or --split says otherwise.
- load(...): the training pairs (if asked for) and the held-out pairs of a plan, with what loading skipped
  and, with dedup / decontaminate (support/audit.py), removed; load_for_evaluation(...): eval.py's pairs,
  saying which they are. Duplicates go before a held-out share is taken, so the same pair (up to whitespace
  and case) is never on both sides; without dedup, held-out pairs that are training pairs too are counted
  and reported (a note), not removed.
- HeldOut: the held-out pairs as train.py keeps them through a run, tokenised once.
- what_was_read: train.py's record of the training data read (count, digest, removals, file
  fingerprints), which a resume compares.

The pairs themselves (data.load_pairs, data.split_held_out, data.DataStats) belong to the lesson's data.py,
which this module imports; it only decides which of them are held out.
"""
import sys
from typing import NamedTuple

import data
from support import audit, ranked, readers
from support.distributed import print0
from support.errors import UserError

# The share of the training pairs held out when the evaluation data would be the training files.
DEFAULT_EVAL_FRACTION = 0.05


class Plan(NamedTuple):
    sources: list            # where the held-out pairs come from ([] with split "none": no evaluation)
    split: str               # their split; "train" for a held-out share of the training pairs
    fraction: float | None   # the share of the training pairs held out by content hash, or None


class HeldOut(NamedTuple):
    """The held-out pairs, tokenised once, what loading them skipped (it shows in the report), and the plan
    they follow (what train_config.json, the checkpoints and the report record)."""
    items: list
    stats: data.DataStats
    sources: list
    split: str
    fraction: float | None


class Loaded(NamedTuple):
    train: list
    train_stats: data.DataStats
    held_out: list
    held_out_stats: data.DataStats
    removed: dict | None = None  # {"duplicate": n, "conflicting": n} with dedup, "contaminated": n with decontaminate

    @property
    def removal(self) -> str:
        """What was removed, for the data: line: " | removed: 3 duplicate, 1 conflicting", or ""."""
        return audit.removed_line(self.removed or {})


def files_of(sources: list, split: str) -> set[str]:
    return set().union(*(readers.source_files(s, split) for s in sources))


def plan_training(dataset: list, eval_dataset: list | None, eval_split: str, eval_fraction: float | None) -> Plan:
    """train.py's held-out pairs: --eval_fraction, or --eval_dataset (default --dataset) at --eval_split."""
    if eval_split == "none":
        return Plan([], "none", None)
    if eval_fraction is not None:
        return Plan(list(dataset), "train", eval_fraction)
    sources = list(eval_dataset or dataset)
    train_files, eval_files = files_of(dataset, "train"), files_of(sources, eval_split)
    if eval_files == train_files:
        return Plan(list(dataset), "train", DEFAULT_EVAL_FRACTION)
    if eval_files & train_files:
        raise UserError(f"the evaluation data ({', '.join(sources)}, split {eval_split}) includes training "
                        f"files ({', '.join(sorted(eval_files & train_files)[:3])}), so its accuracy would not be "
                        "held out; pass held-out files with --eval_dataset, hold out a share of the training "
                        "pairs with --eval_fraction 0.05, or turn evaluation off with --eval_split none")
    return Plan(sources, eval_split, None)


def plan_evaluation(dataset: list, split: str | None, dataset_given: bool, trained: dict) -> Plan:
    """eval.py's pairs: the held-out share the model was trained with (config.json's eval_fraction) when
    neither --dataset nor --split is given, else `split` (default test) of `dataset`."""
    fraction = trained.get("eval_fraction") if not dataset_given and split is None else None
    return Plan(list(dataset), "train", fraction) if fraction else Plan(list(dataset), split or "test", None)


def training_files_in(plan: Plan, trained_dataset: list) -> list[str]:
    """The files of a model's training data that `plan` evaluates on (a model trained elsewhere: its
    training files may not be here, and then none are found)."""
    try:
        trained_files = files_of(trained_dataset, "train")
    except UserError:
        trained_files = set()
    return sorted(trained_files & files_of(plan.sources, plan.split))


def load(plan: Plan, dataset: list, max_train_samples: int | None, max_eval_samples: int | None,
         chat_format=None, with_training_pairs: bool = True, groups: bool = False, dedup: bool = False,
         decontaminate: list | None = None, char_cap: int | None = None) -> Loaded:
    """The training pairs of `dataset` (none unless with_training_pairs, or a held-out share needs them) and
    the held-out pairs of `plan`, each with its data.DataStats. A held-out share reads every training pair and
    splits them by content, so it does not depend on the sample limits; its pairs are counted as held-out
    pairs, while what the reading skipped counts as training's. Either side may be empty. groups: ranked
    groups instead of pairs (support/ranked.py; a pair row is a group of two), whole groups held out.
    dedup drops repeated and contradicting pairs (groups) of those read (audit.dedup; before the held-out
    share is taken), decontaminate (benchmark files) the training pairs sharing a 13-gram with their
    prompts; what each removed is in Loaded.removed. char_cap: each pair's texts are cut as they are read to
    what the max_length they are tokenised at can use (data.cut_texts, ranked.cut_group: the same token ids,
    a bounded memory); not with dedup or decontaminate, which compare the whole texts."""
    train_stats, held_stats = data.DataStats(), data.DataStats()
    load_rows, split_held_out = (ranked.load_groups, ranked.split_held_out) if groups else \
        (data.load_pairs, data.split_held_out)
    removed = {}
    benchmarks = audit.load_benchmarks(decontaminate) if decontaminate else None  # checked before any reading

    cut = {} if dedup or decontaminate else {"char_cap": char_cap}

    def read(sources, split, max_samples, stats, training=False):  # conversational rows: rendered with chat_format
        rows = load_rows(sources, split, max_samples, stats, chat_format=chat_format, **cut)
        if dedup and training:
            rows, counts = audit.dedup(rows)
            removed.update(counts)
        return rows

    def clean(train):  # the training side only: held-out pairs are evaluated as they are
        if benchmarks is None:
            return train
        train, removed["contaminated"] = audit.decontaminate(train, benchmarks)
        return train
    if plan.fraction is None:
        train = clean(read(dataset, "train", max_train_samples, train_stats, True)) if with_training_pairs else []
        held = read(plan.sources, plan.split, max_eval_samples, held_stats) if plan.split != "none" else []
        report_overlap(train, held, "; python -m tools.inspect_data TRAIN --audit --eval HELD_OUT shows them")
        return Loaded(train, train_stats, held, held_stats, removed or None)
    train, held = split_held_out(read(dataset, "train", None, train_stats, True), plan.fraction)
    held = held[:max_eval_samples]
    report_overlap(train, held, "" if dedup else "; --dedup removes duplicates before a held-out share is taken")
    return Loaded(clean(train)[:max_train_samples], train_stats, held, data.DataStats.of_pairs(held), removed or None)


def report_overlap(train: list, held: list, fix: str):
    """A note when held-out pairs (or their prompts) are training pairs too (audit.overlap), ending with `fix`
    (what to do, or ""); never fixed here."""
    if not (train and held):
        return
    overlap = audit.overlap(train, held)
    if overlap["pairs"] or overlap["prompts"]:
        print0(f"note: of the {len(held)} held-out pairs, {overlap['pairs']} are also training pairs and "
               f"{overlap['prompts']} have a prompt that training has (up to whitespace and case){fix}")



def what_was_read(plan: Plan, dataset: list, loaded: Loaded, train_digest: str) -> dict:
    """train.py's record of its training data (trainer_state.json's "data"), for a resume to notice a change:
    the training pairs read (their count and digest), what dedup/decontaminate removed, and the files'
    fingerprints."""
    files = readers.file_fingerprints(dataset, "train")
    if plan.split != "none":
        files.update(readers.file_fingerprints(plan.sources, plan.split))
    return {"train_pairs": len(loaded.train), "removed": loaded.removed,
            "train_digest": DIGEST_VERSION + train_digest, "files": files}


# The digest of the training data is made of each pair's whole-text hash since the texts are cut as they are
# read; checkpoints of older runs hold a digest of another kind (no version prefix): their count is checked.
DIGEST_VERSION = "v2:"


def load_for_evaluation(plan: Plan, trained: dict, max_samples: int | None, chat_format=None,
                        char_cap: int | None = None):
    """eval.py's (pairs, stats) of `plan`: a held-out share is announced; other data that holds the model's
    training files gets a note (its accuracy is not a held-out number). A ranked source (support/ranked.py)
    gives groups, whole groups held out."""
    groups = ranked.is_ranked(plan.sources, plan.split)
    # a share held out after deduplication (--dedup): the same duplicates go first, so it is the same share
    loaded = load(plan, plan.sources, None, max_samples, chat_format, with_training_pairs=False, groups=groups,
                  dedup=bool(plan.fraction and trained.get("dedup")), char_cap=char_cap)
    if plan.fraction:
        print(f"data: the {len(loaded.held_out)} pairs of {', '.join(plan.sources)} that train.py held out "
              f"(--eval_fraction {plan.fraction}, by content hash) and did not train on")
    elif shared := training_files_in(plan, trained.get("dataset") or []):
        print(f"note: the {plan.split} pairs of {', '.join(plan.sources)} include the model's training data "
              f"({', '.join(shared[:3])}): the accuracy is not a held-out number", file=sys.stderr)
    return loaded.held_out, loaded.held_out_stats
