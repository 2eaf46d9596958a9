"""support/audit.py, tools.inspect_data --audit and train.py --dedup/--decontaminate: planted fixtures with
hand-counted findings (issue 29's definitions)."""
import json

import pytest

from support import audit
from support.errors import UserError
from tools import inspect_data

# A benchmark prompt of 21 words. CONTAMINATED shares its first 15 words (a 13-gram, and more: counted once)
# with other case and punctuation; TWELVE shares exactly 12 consecutive words (the 13th differs): not counted.
BENCH_PROMPT = ("The quick brown fox jumps over the lazy dog while the farmer watches from his old red tractor "
                "near the barn")
CONTAMINATED = "Hey! THE quick, brown fox -- jumps over the lazy dog; while the farmer Watches from his... what next?"
TWELVE = "My friend said the quick brown fox jumps over the lazy dog while the farmer cries. Why?"
BREAD, SOUP = "How do I bake bread?", "What soup is good in winter?"
LONG = "no " * 1500  # 4500 characters: its example is cut

# (prompt, chosen, rejected), in file order, with what each is (the hand count the tests check)
TRAIN = [
    (BREAD, "Use flour, water and yeast.", "Buy it."),                  # 1 new
    (BREAD, "Use flour, water and yeast.", "Buy it."),                  # 2 duplicate (exact)
    ("how  do I\tbake BREAD? ", "use flour,  water and YEAST.", " buy it."),  # 3 duplicate (whitespace, case)
    (BREAD, "Buy it.", "Use flour, water and yeast."),                  # 4 conflicting (1 reversed)
    (BREAD, "Knead it well.", "No idea."),                              # 5 duplicate prompt
    (SOUP, "Lentil soup warms you up.", LONG),                          # 6 new
    (SOUP, LONG, "Lentil soup warms you up."),                          # 7 conflicting (6 reversed)
    (SOUP, LONG, "Lentil soup warms you up."),                          # 8 duplicate (of 7)
    (CONTAMINATED, "A tractor ride.", "Nothing."),                      # 9 new, contaminated
    (TWELVE, "It cries.", "The farmer is sad today."),                  # 10 new, a 12-gram only
    (CONTAMINATED, "Ask the farmer.", "Sleep."),                        # 11 duplicate prompt, contaminated
]
HELD = [
    (BREAD, "Use flour, water and yeast.", "Buy it."),                  # a training pair: pairs and prompts
    ("HOW DO I BAKE BREAD?", "Ask a baker.", "Guess."),                 # a training prompt only
    (SOUP + "  ", "Lentil soup warms you up.", LONG),                   # a training pair, up to whitespace
    ("Where is the moon?", "Up there.", "Down here."),                  # neither
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def planted(tmp_path):
    """(training file, held-out file, RewardBench file, RewardBench 2 file) of the planted findings. The
    training file has one more row, skipped (chosen == rejected): rows 12, pairs 11."""
    rows = [dict(prompt=p, chosen=c, rejected=r) for p, c, r in TRAIN]
    rows.insert(4, dict(prompt=BREAD, chosen="Same.", rejected="Same."))
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [dict(prompt=p, chosen=c, rejected=r) for p, c, r in HELD])
    bench = write_jsonl(tmp_path / "bench.jsonl", [
        dict(prompt=BENCH_PROMPT, chosen="a", rejected="b", subset="alpacaeval-easy", id=1),
        dict(prompt="Short prompt of few words.", chosen="a", rejected="b", subset="alpacaeval-easy", id=2)])
    # RewardBench 2's layout (lists of responses), recognised by its columns; its 13 words are in no training prompt
    rb2 = write_jsonl(tmp_path / "rb2.jsonl", [dict(
        prompt="one two three four five six seven eight nine ten eleven twelve thirteen", chosen=["a"],
        rejected=["b", "c"], subset="Focus", id="x", num_correct=1)])
    return train, held, bench, rb2


def test_planted_counts_every_key(planted, tmp_path, capsys):
    train, held, bench, rb2 = planted
    out = tmp_path / "audit.json"
    found = inspect_data.main([train, "--audit", "--eval", held, "--benchmark", bench, rb2, "--json", str(out)])
    assert json.loads(out.read_text()) == found
    longer = sum(len(c) > len(r) for _, c, r in TRAIN)
    assert longer == 8  # by hand: pairs 1, 2, 3, 5, 7, 8, 9, 11 have the longer chosen response
    expected = {"rows": 12, "pairs": 11, "ranked": False, "duplicate_pairs": 3, "conflicting_pairs": 2, "duplicate_prompts": 2,
                "held_out_pairs": 4, "train_eval_overlap": {"pairs": 2, "prompts": 3},
                "contaminated": {"bench.jsonl": 2, "rb2.jsonl": 0}, "length": longer / 11,
                "length_unit": "characters"}
    assert {k: v for k, v in found.items() if k != "examples"} == expected
    examples = found["examples"]
    assert [e["pair"] for e in examples["duplicate_pairs"]] == [2, 3, 8]
    assert [e["pair"] for e in examples["conflicting_pairs"]] == [4, 7]
    assert [e["pair"] for e in examples["duplicate_prompts"]] == [5, 11]
    assert [(e["pair"], e["benchmark"]) for e in examples["contaminated"]] == [(9, "bench.jsonl"), (11, "bench.jsonl")]
    assert [(e["pair"], e["same_pair"]) for e in examples["train_eval_overlap"]] == [(1, True), (2, False), (3, True)]
    cut = examples["duplicate_pairs"][2]["chosen"]  # LONG, cut to its first and last 1000 characters
    assert len(cut) < audit.EXAMPLE_CHARS + 40 and cut.startswith("no no") and "[... 2500 characters ...]" in cut
    table = capsys.readouterr().out
    assert "duplicate pairs              3" in table and "contaminated                 2" in table


def test_the_same_file_as_held_out_data_overlaps_entirely(planted):
    train, *_ = planted
    found = inspect_data.main([train, "--audit", "--eval", train])
    assert found["held_out_pairs"] == 11 and found["train_eval_overlap"] == {"pairs": 11, "prompts": 11}
    assert found["contaminated"] == {} and "contaminated" not in found["examples"]


def test_ngrams_are_words_lower_cased_without_punctuation():
    assert audit.words("Don't STOP -- the  end.Start") == ["dont", "stop", "the", "endstart"]
    index = audit.Benchmarks({"b": [BENCH_PROMPT]})
    assert index.contaminated([CONTAMINATED, TWELVE, BENCH_PROMPT, BENCH_PROMPT[:60], ""]) == [["b"], [], ["b"], [], []]
    # a 13-gram split across two texts is not one: each text is checked on its own
    half = BENCH_PROMPT.split()
    assert audit.Benchmarks({"b": [BENCH_PROMPT]}).contaminated([" ".join(half[:7]), " ".join(half[7:12])]) == [[], []]


def test_audit_tokens_with_a_model(planted, tmp_path):
    """--model: the length share counts tokens, as training tokenises the responses."""
    from support.demo import demo_tokenizer
    demo_tokenizer().save(str(tmp_path / "tok"))
    train, *_ = planted
    found = inspect_data.main([train, "--audit", "--model", str(tmp_path / "tok"), "--max_length", "64"])
    assert found["length_unit"] == "tokens" and found["pairs"] == 11


def test_audit_options_need_audit_and_a_benchmark_file(planted, capsys):
    train, held, bench, _ = planted
    with pytest.raises(UserError, match="--eval, --benchmark and --json are --audit's options; add --audit"):
        inspect_data.main([train, "--eval", held])
    with pytest.raises(UserError, match="not a RewardBench, RewardBench 2 or RM-Bench file"):
        inspect_data.main([train, "--audit", "--benchmark", train])
    with pytest.raises(UserError, match="exists and is not an audit report .* choose another --json FILE"):
        inspect_data.main([train, "--audit", "--json", held])  # a typo must not overwrite data
    assert len(open(held).read().splitlines()) == len(HELD)


def test_dedup_and_decontaminate_remove_exactly_the_planted_pairs(planted):
    from data import Pair
    pairs = [Pair(p, c, r) for p, c, r in TRAIN]
    kept, removed = audit.dedup(pairs)
    assert removed == {"duplicate": 3, "conflicting": 2}
    assert kept == [pairs[i] for i in (0, 4, 5, 8, 9, 10)]
    _, _, bench, _ = planted
    clean, n = audit.decontaminate(kept, audit.load_benchmarks([bench]))
    assert n == 2 and clean == [pairs[i] for i in (0, 4, 5, 9)]


def test_train_dedup_and_decontaminate_record_what_they_removed(planted, tmp_path, capsys):
    import train
    from test_train import tiny_cfg
    train_file, held, bench, _ = planted
    # the held-out pairs that are training pairs too are reported, never removed (pairs 1 and 3 of HELD)
    note = "note: of the 4 held-out pairs, 2 are also training pairs and 3 have a prompt that training has"
    plain = tiny_cfg(tmp_path, "plain", dataset=[train_file], eval_dataset=[held], max_eval_samples=None)
    *_, read = train.load_data(plain, train.build_model(plain).tokenizer)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("data:"))
    assert note in out and "removed" not in line and read["removed"] is None
    assert line.startswith("data: 8 training pairs, 3 eval pairs")  # 11, of which 6, 7 and 8 are too long

    train.train(tiny_cfg(tmp_path, "clean", dataset=[train_file], eval_dataset=[held], max_eval_samples=None,
                         max_steps=1, dedup=True, decontaminate=[bench]))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("data:"))
    assert note in out and line.startswith("data: 3 training pairs, 3 eval pairs")  # 1, 5 and 10 (6: too long)
    assert line.endswith(" | removed: 3 duplicate, 2 conflicting, 2 contaminated"), line
    config = json.loads((tmp_path / "clean" / "train_config.json").read_text())
    report = json.loads((tmp_path / "clean" / "evaluation_report.json").read_text())
    removed = {"duplicate": 3, "conflicting": 2, "contaminated": 2}
    assert config["removed"] == removed and report["removed"] == removed
    assert config["dedup"] is True and config["decontaminate"] == [bench]


def test_held_out_share_is_taken_after_dedup_and_eval_takes_the_same(planted, capsys):
    from support import heldout
    train_file, *_ = planted
    plan = heldout.Plan([train_file], "train", 0.5)
    loaded = heldout.load(plan, [train_file], None, None, dedup=True)
    overlap = audit.overlap(loaded.train, loaded.held_out)
    assert overlap["pairs"] == 0 and overlap["prompts"] > 0  # prompts may be on both sides: said, nothing to fix
    assert capsys.readouterr().out.rstrip().endswith(
        f"{overlap['prompts']} have a prompt that training has (up to whitespace and case)")
    assert loaded.removed == {"duplicate": 3, "conflicting": 2} and len(loaded.train) + len(loaded.held_out) == 6
    keys = lambda pairs: {audit.digests(p)[1] for p in pairs}  # noqa: E731
    assert loaded.train and loaded.held_out and not keys(loaded.train) & keys(loaded.held_out)
    # eval.py on a model trained so: the same held-out pairs (the duplicates removed first again)
    held, _ = heldout.load_for_evaluation(plan, {"dedup": True, "eval_fraction": 0.5}, None)
    assert held == loaded.held_out


def test_ranked_groups_count_per_group(tmp_path):
    """A group is its prompt and its ranking: the same ranking in another row order is a duplicate, the
    ranking upside down a conflict; the length share is over each group's strictly ordered pairs."""
    a, b, c, d, x, y = "aaaa", "bb", "cccccc", "d", "xxx", "y"
    rows = [dict(prompt="P1", responses=[a, b, c], scores=[3, 2, 1]),   # 1 new
            dict(prompt="P1", responses=[c, a, b], scores=[1, 3, 2]),   # 2 duplicate: the same ranking
            dict(prompt="p1 ", responses=[c, b, a], scores=[3, 2, 1]),  # 3 conflicting: upside down
            dict(prompt="P1", responses=[a, b, d], scores=[3, 2, 1]),   # 4 duplicate prompt
            dict(prompt="P2", responses=[x, y], scores=[1, 0])]         # 5 new
    train = write_jsonl(tmp_path / "ranked.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [dict(prompt="P1", responses=[b, a, c], scores=[2, 3, 1]),
                                                 dict(prompt="P3", responses=[x, y], scores=[0, 1])])
    found = inspect_data.main([train, "--audit", "--eval", held])
    # longer and better, of the ordered pairs: 1 of 3, 1 of 3, 2 of 3 (c > b, c > a), 3 of 3, 1 of 1
    assert {k: v for k, v in found.items() if k != "examples"} == {
        "rows": 5, "pairs": 5, "ranked": True, "duplicate_pairs": 1, "conflicting_pairs": 1, "duplicate_prompts": 1,
        "held_out_pairs": 2, "train_eval_overlap": {"pairs": 1, "prompts": 1}, "contaminated": {},
        "length": 8 / 13, "length_unit": "characters"}
    assert found["examples"]["conflicting_pairs"][0]["responses"] == [c, b, a]
    from support import ranked
    groups = ranked.load_groups([train])
    kept, removed = audit.dedup(groups)
    assert removed == {"duplicate": 1, "conflicting": 1} and kept == [groups[0], groups[3], groups[4]]


def test_decontaminate_path_that_does_not_exist_fails_before_anything(tmp_path):
    from test_train import tiny_cfg
    from train import train
    with pytest.raises(UserError, match=r"--decontaminate .*nope.jsonl: no such file or directory; give local "):
        train(tiny_cfg(tmp_path, "run", decontaminate=[str(tmp_path / "nope.jsonl")]))
    assert not (tmp_path / "run").exists()


def test_rm_bench_files_and_conversation_prompts_are_read_as_eval_reads_them(tmp_path):
    """An RM-Bench file (chosen/rejected as lists, a domain) is recognised by its columns; a prompt given as
    turns (RewardBench's multi-turn rows) counts by the words of its turns, in order."""
    words = BENCH_PROMPT.split()
    rm_bench = write_jsonl(tmp_path / "total_dataset.jsonl", [
        dict(prompt=BENCH_PROMPT, chosen=["a", "b", "c"], rejected=["d", "e", "f"], domain="chat", id=1)])
    turns = write_jsonl(tmp_path / "turns.jsonl", [dict(
        prompt=[{"role": "user", "content": " ".join(words[:13])}, {"role": "assistant", "content": "ok"}],
        chosen="a", rejected="b", subset="mt-bench-hard", id=1)])
    index = audit.load_benchmarks([rm_bench, turns])
    assert index.names == ["total_dataset.jsonl", "turns.jsonl"]
    assert index.contaminated([CONTAMINATED, " ".join(words[:13]), " ".join(words[1:14])]) == [
        ["total_dataset.jsonl", "turns.jsonl"], ["total_dataset.jsonl", "turns.jsonl"], ["total_dataset.jsonl"]]
