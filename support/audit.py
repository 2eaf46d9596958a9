"""Check preference data before trusting a score: duplicates, contradictions, train/held-out overlap,
benchmark contamination, and what "the longer response is better" alone would score on it.

    python -m tools.inspect_data SOURCE... --audit [--eval SOURCE...] [--benchmark PATH...] [--json FILE]
    python train.py ... --dedup --decontaminate PATH...

The rules (from Skywork-Reward-V2's paper: dedup on the (history, chosen, rejected) tuple, and removal of
every training example sharing a 13-gram with a benchmark prompt), as the report's keys count them:
- Normalisation for duplicates: runs of whitespace collapse to one space, the ends are trimmed, case folds
  (normalise). Texts differing by a word are different: near-duplicates are not found.
- duplicate_pairs: a pair (prompt, chosen, rejected) equal to an earlier one; the first occurrence does not
  count, so a pair seen three times counts 2.
- conflicting_pairs: a pair whose reverse (same prompt, chosen and rejected swapped) appeared earlier; each
  conflict counts once, as the later pair, which is what dedup() drops (the first is kept).
- duplicate_prompts: a pair whose prompt appeared earlier with other responses (neither a duplicate nor a
  reverse): a prompt with 3 different pairs counts 2. Not an error; worth knowing.
- train_eval_overlap: held-out pairs equal to a training pair ("pairs"), and held-out pairs whose prompt
  occurs in training, equal pairs included ("prompts").
- contaminated: per benchmark file, training pairs whose prompt shares a 13-gram of words with a prompt of
  it; words are lower-cased with punctuation removed (words). A pair counts once however many it shares;
  a benchmark prompt of fewer than 13 words matches nothing.
- length: the share of all pairs whose chosen response is strictly longer (characters, or tokens when the
  caller gives lengths): the accuracy of "pick the longer one" on this data.
Ranked groups (support/ranked.py) count as one each: a group is its prompt and its ranking (the responses
level by level, best first), so a duplicate is the same ranking of the same texts, a conflict the ranking
upside down (for a group of two: the reversed pair), and the length share is over each group's strictly
ordered pairs.
Memory: hashes, never texts: about 300 bytes per pair (three sets of 16-byte digests), plus the
benchmarks' 13-gram hashes (8 bytes each) and at most EXAMPLES cut texts per finding. 13-grams are compared
by a 64-bit hash of their words (a false match between two different 13-grams: ~2^-64 per comparison).
"""
import hashlib
import os
import re

import numpy as np

from support.errors import UserError

NGRAM = 13                # words in a contamination n-gram (Skywork-Reward-V2)
EXAMPLES = 3              # instances kept per finding
EXAMPLE_CHARS = 2000      # a kept text longer than this keeps its first and last half of it
CHUNK = 2048              # training prompts checked against the benchmarks at a time (numpy)
PUNCTUATION = re.compile(r"[^\w\s]+")
FINDINGS = ("duplicate_pairs", "conflicting_pairs", "duplicate_prompts", "train_eval_overlap", "contaminated")


def normalise(text: str) -> str:
    """Whitespace runs -> one space, ends trimmed, case folded: what makes two texts the same."""
    return " ".join(text.split()).casefold()


def digest(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def ranking(item) -> tuple[str, list, list]:
    """(prompt, responses, levels) of a data.Pair (chosen level 1, rejected 0) or a ranked.Group."""
    if hasattr(item, "responses"):
        return item.prompt, item.responses, item.levels
    return item.prompt, [item.chosen, item.rejected], [1, 0]


def digests(item) -> tuple[bytes, bytes, bytes]:
    """(prompt, whole, reversed) digests of a pair or a ranked group, from its normalised texts. A group is
    its ranking: the responses level by level, best first (the order within a level does not matter), so the
    same ranking in another row order is the same group, and a pair is the ranking chosen > rejected; its
    reverse is the ranking upside down."""
    prompt, responses, levels = ranking(item)
    tiers = {}
    for text, level in zip(responses, levels):
        tiers.setdefault(level, []).append(digest(text))
    ordered = [len(t).to_bytes(4, "big") + b"".join(sorted(t)) for _, t in sorted(tiers.items(), reverse=True)]
    p = digest(prompt)
    return (p, hashlib.blake2b(p + b"".join(ordered), digest_size=16).digest(),
            hashlib.blake2b(p + b"".join(reversed(ordered)), digest_size=16).digest())


def words(text: str) -> list[str]:
    """The words n-grams are made of: lower-cased (case-folded, as normalise does, so that prompts equal up to
    case have the same words), punctuation removed ("Don't!" -> "dont")."""
    return PUNCTUATION.sub("", text.casefold()).split()


def cut(text: str) -> str:
    if len(text) <= EXAMPLE_CHARS:
        return text
    half = EXAMPLE_CHARS // 2
    return f"{text[:half]} [... {len(text) - 2 * half} characters ...] {text[-half:]}"


def example(item, number: int, **extra) -> dict:
    """A finding's instance as the report shows it: where it is (its number in reading order, from 1), its
    source and its texts, cut (a ranked group: its responses and levels)."""
    texts = {"responses": [cut(r) for r in item.responses], "levels": item.levels} if hasattr(item, "responses") \
        else {"chosen": cut(item.chosen), "rejected": cut(item.rejected)}
    return {"pair": number, "source": item.source, **extra, "prompt": cut(item.prompt), **texts}


# ----------------------------------------------------------------------------------------------
# The benchmarks' 13-grams


class Benchmarks:
    """The 13-grams of the prompts of some benchmark files, built once: a training prompt's words are mapped
    to ids (a word no benchmark has can't be in a shared 13-gram), every window of 13 known words is hashed
    with numpy, and the hashes are looked up in the benchmarks' sorted hashes."""
    def __init__(self, prompts: dict[str, list[str]], n: int = NGRAM):
        self.n, self.names, self.vocab = n, list(prompts), {}
        rng = np.random.default_rng(0)
        self.multipliers = rng.integers(1, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.word_values = np.zeros(1, dtype=np.uint64)  # id 0: a word no benchmark has
        ids_by_name = {}
        for name, texts in prompts.items():
            ids_by_name[name] = [np.array([self.vocab.setdefault(w, len(self.vocab) + 1) for w in words(t)],
                                          dtype=np.int64) for t in texts]
        self.word_values = np.concatenate([self.word_values, rng.integers(1, 2**64 - 1, size=len(self.vocab),
                                                                          dtype=np.uint64)])
        self.hashes = {name: np.unique(np.concatenate([self.window_hashes(ids)[0] for ids in ids_list] or
                                                      [np.zeros(0, np.uint64)]))
                       for name, ids_list in ids_by_name.items()}
        self.grams = {name: len(h) for name, h in self.hashes.items()}

    def window_hashes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hashes, start positions) of the windows of n ids that hold no 0 (an unknown word or a separator)."""
        if len(ids) < self.n:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        values, windows = self.word_values[ids], len(ids) - self.n + 1
        with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
            h = np.zeros(windows, dtype=np.uint64)
            for k in range(self.n):
                h += values[k:k + windows] * self.multipliers[k]
        unknown = np.concatenate([[0], np.cumsum(ids == 0)])
        valid = unknown[self.n:] - unknown[:windows] == 0
        return h[valid], np.flatnonzero(valid)

    def contaminated(self, texts: list[str]) -> list[list[str]]:
        """For each text, the benchmarks it shares a 13-gram with (usually none)."""
        ids, starts = [], []
        for text in texts:  # one array for all: each text followed by a separator (id 0)
            starts.append(len(ids))
            ids += [self.vocab.get(w, 0) for w in words(text)]
            ids.append(0)
        h, pos = self.window_hashes(np.array(ids, dtype=np.int64))
        found = [[] for _ in texts]
        for name, table in self.hashes.items():
            if len(table) == 0 or len(h) == 0:
                continue
            where = np.minimum(np.searchsorted(table, h), len(table) - 1)
            for i in np.unique(np.searchsorted(starts, pos[table[where] == h], side="right") - 1):
                found[i].append(name)
        return found


def benchmark_prompts(path: str) -> tuple[str, list[str]]:
    """(name, prompt texts) of a local RewardBench, RewardBench 2 or RM-Bench file (or directory), read as
    eval.py reads it (support/benchmarks.py); which one it is, its columns say."""
    from support import benchmarks
    errors = []
    for layout in ("rewardbench2", "rm-bench", "rewardbench"):  # rewardbench2 has rewardbench's columns and more
        try:
            examples = benchmarks.read_examples(layout, path, {})
        except UserError as e:
            errors.append(str(e))
            continue
        texts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in (e.prompt for e in examples)]
        return os.path.basename(os.path.normpath(path)), texts
    raise UserError(f"{path}: not a RewardBench, RewardBench 2 or RM-Bench file ({errors[-1]}); "
                    "see docs/benchmarks.md for their files")


def load_benchmarks(paths: list[str]) -> Benchmarks:
    """The 13-gram index of the benchmark files, keyed by file name (the path as given when two share it)."""
    prompts = {}
    for path in paths:
        name, texts = benchmark_prompts(path)
        prompts[path if name in prompts else name] = texts
    return Benchmarks(prompts)


# ----------------------------------------------------------------------------------------------
# The audit: training pairs streamed through add(), then held-out pairs through add_held_out()


class Audit:
    """Counts the findings of a stream of pairs, keeping hashes only (see the module docstring)."""
    def __init__(self, benchmarks: Benchmarks | None = None):
        self.benchmarks = benchmarks
        self.pairs_seen, self.reversed_seen, self.prompts_seen = set(), set(), set()
        self.counts = dict.fromkeys(("pairs", "duplicate_pairs", "conflicting_pairs", "duplicate_prompts"), 0)
        self.overlap = {"pairs": 0, "prompts": 0}
        self.held_out = 0
        self.contaminated = dict.fromkeys(benchmarks.names, 0) if benchmarks else {}
        self.longer, self.ordered, self.length_unit = 0, 0, "characters"
        self.examples = {key: [] for key in FINDINGS}
        self.ranked = False  # a ranked group was seen: "pairs" counts groups
        self.pending = []  # (number, pair, prompt digest, first time seen) waiting for the benchmark check
        self.prompt_hits = {}  # prompt digest -> the benchmarks it shares a 13-gram with (contaminated ones only)

    def keep_example(self, finding: str, pair, number: int, **extra):
        if len(self.examples[finding]) < EXAMPLES:
            self.examples[finding].append(example(pair, number, **extra))

    def add(self, pair, lengths: tuple[int, int] | None = None) -> str | None:
        """One training pair (or ranked group: counted as one), in reading order. Returns what dedup drops it
        as ("duplicate", "conflicting"), else None. lengths: (chosen, rejected) in tokens, not characters."""
        self.counts["pairs"] += 1
        self.ranked |= hasattr(pair, "responses")
        number = self.counts["pairs"]
        prompt, key, reverse = digests(pair)
        if lengths is not None:
            self.length_unit = "tokens"
        _, responses, levels = ranking(pair)
        sizes = lengths if lengths is not None else [len(r) for r in responses]
        for i, j in ((i, j) for i in range(len(levels)) for j in range(len(levels)) if levels[i] > levels[j]):
            self.ordered += 1  # a group: each of its strictly ordered pairs
            self.longer += sizes[i] > sizes[j]
        if self.benchmarks is not None:  # a prompt seen before (normalised) has the same words: checked once
            self.pending.append((number, pair, prompt, prompt not in self.prompts_seen))
            if len(self.pending) >= CHUNK:
                self.check_pending()
        finding = None
        if key in self.pairs_seen:
            finding = "duplicate"
            self.counts["duplicate_pairs"] += 1
            self.keep_example("duplicate_pairs", pair, number)
        elif key in self.reversed_seen:  # an earlier pair is this one reversed
            finding = "conflicting"
            self.counts["conflicting_pairs"] += 1
            self.keep_example("conflicting_pairs", pair, number)
        elif prompt in self.prompts_seen:
            self.counts["duplicate_prompts"] += 1
            self.keep_example("duplicate_prompts", pair, number)
        self.pairs_seen.add(key)
        self.reversed_seen.add(reverse)
        self.prompts_seen.add(prompt)
        return finding

    def check_pending(self):
        """The pending training prompts against the benchmarks' 13-grams."""
        pending, self.pending = self.pending, []
        new = [(prompt, pair.prompt) for _, pair, prompt, is_new in pending if is_new]
        for (prompt, _), names in zip(new, self.benchmarks.contaminated([text for _, text in new])):
            if names:
                self.prompt_hits[prompt] = names
        for number, pair, prompt, _ in pending:
            for name in self.prompt_hits.get(prompt, ()):
                self.contaminated[name] += 1
                self.keep_example("contaminated", pair, number, benchmark=name)

    def add_held_out(self, pair):
        """One held-out pair, after every training pair."""
        self.held_out += 1
        prompt, key, _ = digests(pair)
        if key in self.pairs_seen:
            self.overlap["pairs"] += 1
        if prompt in self.prompts_seen:
            self.overlap["prompts"] += 1
            self.keep_example("train_eval_overlap", pair, self.held_out, same_pair=key in self.pairs_seen)

    def report(self, rows: int, held_out: bool) -> dict:
        """The findings: `rows` read (data.DataStats.read); train_eval_overlap is None without held-out data."""
        if self.pending:
            self.check_pending()
        pairs = self.counts["pairs"]
        return {"rows": rows, **self.counts, "ranked": self.ranked,
                "held_out_pairs": self.held_out if held_out else None,
                "train_eval_overlap": dict(self.overlap) if held_out else None,
                "contaminated": dict(self.contaminated),
                "length": self.longer / self.ordered if self.ordered else None, "length_unit": self.length_unit,
                "examples": {k: v for k, v in self.examples.items() if v}}


# ----------------------------------------------------------------------------------------------
# Acting on it: train.py --dedup and --decontaminate


def dedup(pairs: list) -> tuple[list, dict]:
    """(the pairs without duplicates and conflicting reverses, first ones kept, in order; {"duplicate": n,
    "conflicting": n} removed)."""
    audit, kept, removed = Audit(), [], {"duplicate": 0, "conflicting": 0}
    for pair in pairs:
        finding = audit.add(pair)
        if finding is None:
            kept.append(pair)
        else:
            removed[finding] += 1
    return kept, removed


def decontaminate(pairs: list, benchmarks: Benchmarks) -> tuple[list, int]:
    """(the pairs whose prompt shares no 13-gram with a benchmark prompt, in order; how many were removed)."""
    prompts, hit = list(dict.fromkeys(p.prompt for p in pairs)), set()  # each distinct prompt checked once
    for start in range(0, len(prompts), CHUNK):
        chunk = prompts[start:start + CHUNK]
        hit.update(text for text, names in zip(chunk, benchmarks.contaminated(chunk)) if names)
    kept = [p for p in pairs if p.prompt not in hit]
    return kept, len(pairs) - len(kept)


def overlap(train: list, held: list) -> dict:
    """{"pairs": held-out pairs equal to a training pair, "prompts": held-out pairs with a training prompt}."""
    checks = Audit()
    for pair in train:
        checks.add(pair)
    for pair in held:
        checks.add_held_out(pair)
    return dict(checks.overlap)


def removed_line(removed: dict) -> str:
    """The data: line's words for what was removed: " | removed: 3 duplicate, 1 conflicting", or ""."""
    return f" | removed: {', '.join(f'{n} {what}' for what, n in removed.items())}" if removed else ""
