"""eval.py --benchmark (support/benchmarks.py): RewardBench, RewardBench 2 and RM-Bench from files in their
published schemas, scored against hand computations from planted rewards; rendering checked against score().

Planted rewards: each response text is "r=<reward>", and RewardModel.score_responses is replaced by one that
reads the reward back, so every score below follows from numbers written in the test."""
import dataclasses
import json
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import eval as eval_cli
from support import benchmarks
from support.errors import UserError
from qwen3 import SHAPES
from rm import RewardModel
from test_chat import make_model_dir

ALL_SUBSETS = [s for names in benchmarks.SECTIONS.values() for s in names]


def planted(self, prompt, responses, normalize=False, max_length=None, batch_size=16):
    return [float(r.split("=")[1]) for r in responses]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_tok):
    """A tiny saved reward model with the demo tokenizer (no chat template)."""
    d = tmp_path_factory.mktemp("bench") / "model"
    torch.manual_seed(0)
    model = RewardModel(SHAPES["tiny"])
    model.model.init_weights(seed=0)
    model.init_head(0)
    model.tokenizer = demo_tok
    model.provenance = {"max_length": 64}
    model.save_pretrained(d)
    return d


def run(model_dir, tmp_path, *args):
    return eval_cli.main([str(model_dir), "--output", str(tmp_path / "out" / "evaluation_report.json"),
                          "--no_progress", "--device", "cpu", *map(str, args)])


def rewardbench_rows():
    """Two examples per official subset, plus one of a subset outside the sections. Wins everywhere except:
    alpacaeval-easy 1 win + 1 tie (a tie loses), mt-bench-hard 0, math-prm 0, Safety 0 but donotanswer."""
    lose = {"mt-bench-hard", "math-prm", "refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
            "xstest-should-respond"}
    rows = []
    for subset in ALL_SUBSETS + ["anthropic_helpful"]:
        for k in range(2):
            chosen, rejected = ("r=0", "r=1") if subset in lose else ("r=2", "r=1")
            if subset == "alpacaeval-easy" and k == 1:
                chosen, rejected = "r=1", "r=1"
            rows.append({"prompt": f"question {subset} {k}", "chosen": chosen, "chosen_model": "a",
                         "rejected": rejected, "rejected_model": "b", "subset": subset, "id": len(rows)})
    return rows


def test_rewardbench_by_hand(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(RewardModel, "score_responses", planted)
    data = tmp_path / "reward-bench" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rewardbench_rows()), data / "filtered-00000-of-00001.parquet")
    # the "raw" split beside it is not read: it would count every example twice
    pq.write_table(pa.Table.from_pylist(rewardbench_rows()), data / "raw-00000-of-00001.parquet")
    report = run(model_dir, tmp_path, "--benchmark", "rewardbench", "--dataset", tmp_path / "reward-bench")
    bench = report["benchmark"]
    chat = (100 * 0.5 + 95 + 95 + 28 + 40) / (100 + 95 + 95 + 28 + 40)
    chat_hard = (100 + 134 + 92 + 47 + 46) / (37 + 100 + 134 + 92 + 47 + 46)
    safety = 136 / (100 + 100 + 250 + 154 + 136)
    reasoning = 6 * 164 / (984 + 6 * 164)      # math-prm (0) weighs as much as all six code subsets (1)
    assert reasoning == 0.5
    assert bench["sections"] == pytest.approx({"Chat": chat, "Chat Hard": chat_hard, "Safety": safety,
                                               "Reasoning": reasoning})
    assert bench["score"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    assert bench["subsets"]["alpacaeval-easy"] == {"score": 0.5, "n": 2}
    assert bench["subsets"]["anthropic_helpful"] == {"score": 1.0, "n": 2}  # reported, in no section
    assert set(bench["subsets"]) == set(ALL_SUBSETS) | {"anthropic_helpful"} and bench["examples"] == 48
    assert bench["rendering"] == "hh-rlhf transcript" and bench["name"] == "rewardbench"
    lines = [json.loads(line) for line in (tmp_path / "out" / "benchmark_rewards.jsonl").read_text().splitlines()]
    assert len(lines) == 48 and lines[0] == {"id": "0", "subset": "alpacaeval-easy", "chosen": [2.0], "rejected": [1.0]}
    assert json.loads((tmp_path / "out" / "evaluation_report.json").read_text()) == report


def test_rewardbench2_best_of_n_and_ties_by_hand(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(RewardModel, "score_responses", planted)

    def row(i, subset, chosen, rejected, id_=None):
        r = lambda xs: [f"r={x}" for x in xs]  # noqa: E731
        return {"id": id_ or str(i), "prompt": f"prompt {i}", "chosen": r(chosen), "rejected": r(rejected),
                "num_correct": len(chosen), "num_incorrect": len(rejected),
                "total_completions": len(chosen) + len(rejected), "models": ["m"] * (len(chosen) + len(rejected)),
                "subset": subset, "additional_metadata": {}}
    rows = [row(0, "Factuality", [3], [1, 2, 3]),          # tied with one other for the best: 1/2
            row(1, "Factuality", [5], [1, 1, 1]),          # 1
            row(2, "Math", [1], [2, 0, 0]),                # 0
            row(3, "Precise IF", [2], [1, 1, 1]), row(4, "Safety", [2], [1, 1, 1]), row(5, "Focus", [2], [1, 0, 1]),
            row(6, "Ties", [5], [1, 2], "ref:1"),          # gap 3, accurate
            row(7, "Ties", [4, 6], [3, 1], "tied:1"),      # gap 1, spread 2, accurate
            row(8, "Ties", [1], [2], "ref:2"),             # gap -1, wrong
            row(9, "Ties", [5, 5.5], [0], "tied:2")]       # gap 5, spread 0.5, accurate
    path = tmp_path / "rb2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = run(model_dir, tmp_path, "--benchmark", "rewardbench2", "--dataset", path)["benchmark"]
    # Ties: tied accuracy 1, ref accuracy 1/2; prompt 1: 1 > 2 no, min(3, 1) > 2 no, tanh(1/2 - 1);
    # prompt 2: 5 > 0.5 yes, min(-1, 5) > 0.5 no, tanh(-1/0.5 - 1)
    ties = 0.3 * 1 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0 + 0.01 * (torch.tanh(torch.tensor(-0.5)).item()
                                                           + torch.tanh(torch.tensor(-3.0)).item()) / 2
    want = {"Factuality": (0.75, 2), "Math": (0.0, 1), "Precise IF": (1.0, 1), "Safety": (1.0, 1),
            "Focus": (1.0, 1), "Ties": (ties, 4)}
    assert {k: v["n"] for k, v in bench["subsets"].items()} == {k: n for k, (_, n) in want.items()}
    assert {k: v["score"] for k, v in bench["subsets"].items()} == pytest.approx({k: s for k, (s, _) in want.items()})
    assert bench["score"] == pytest.approx((0.75 + 0 + 1 + 1 + 1 + ties) / 6) and bench["sections"] == {}


def test_rm_bench_style_matrix_by_hand(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(RewardModel, "score_responses", planted)
    stairs = ([1, 2, 3], [0, 1.5, 2.5])   # chosen style i beats rejected j iff i >= j: hard 0, normal 1, easy 1
    wins, loses = ([5, 5, 5], [0, 0, 0]), ([0, 0, 0], [1, 1, 1])

    def row(i, domain, rewards):
        return {"id": i, "prompt": f"p{i}", "chosen": [f"r={x}" for x in rewards[0]],
                "rejected": [f"r={x}" for x in rewards[1]], "domain": domain}
    rows = [row(0, "chat", stairs), row(1, "chat", wins), row(2, "code", loses), row(3, "math", wins),
            row(4, "safety-refuse", wins), row(5, "safety-response", stairs)]
    path = tmp_path / "total_dataset.json"
    path.write_text(json.dumps(rows))
    bench = run(model_dir, tmp_path, "--benchmark", "rm-bench", "--dataset", path)["benchmark"]
    # chat (and safety): mean of the matrices [[1,0,0],[1,1,0],[1,1,1]] and all ones: hard 0.5, normal 1, easy 1
    chat = (0.5 + 1 + 1) / 3
    assert bench["sections"] == pytest.approx({"chat": chat, "code": 0.0, "math": 1.0, "safety": chat,
                                               "hard": (0.5 + 0 + 1 + 0.5) / 4, "normal": 0.75, "easy": 0.75})
    assert bench["score"] == pytest.approx((chat + 0 + 1 + chat) / 4)
    assert bench["subsets"]["safety-response"] == {"score": pytest.approx((0 + 1 + 1) / 3), "n": 1}
    table = capsys.readouterr().out
    assert table.index("rm-bench (hh-rlhf transcript)") < table.index("  chat") < table.index("    safety-refuse")


def test_hostile_and_wrong_files_are_one_line(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(RewardModel, "score_responses", planted)
    rows = rewardbench_rows()[:4]
    no_subset = tmp_path / "no_subset.jsonl"
    no_subset.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "subset"}) + "\n" for r in rows))
    with pytest.raises(UserError, match="no column subset .*is it the rewardbench data"):
        run(model_dir, tmp_path, "--benchmark", "rewardbench", "--dataset", no_subset)
    with pytest.raises(UserError, match="needs --dataset"):
        run(model_dir, tmp_path, "--benchmark", "rewardbench")
    with pytest.raises(UserError, match="--save_reward_stats apply to preference pairs"):
        run(model_dir, tmp_path, "--benchmark", "rewardbench", "--dataset", no_subset, "--save_reward_stats")
    # bad rows are skipped and counted, never scored
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n[1]\n"
                     + json.dumps({**rows[0], "chosen": 3}) + "\n")
    bench = run(model_dir, tmp_path, "--benchmark", "rewardbench", "--dataset", mixed)["benchmark"]
    assert bench["examples"] == 4
    assert bench["skipped"] == {"unparsable line": 1, "not an object": 1, "bad chosen/rejected": 1}
    # RM-Bench needs three styles
    bad = tmp_path / "rm.json"
    bad.write_text(json.dumps([{"id": 0, "prompt": "p", "chosen": ["r=1", "r=2"], "rejected": ["r=0", "r=0"],
                                "domain": "chat"}]))
    with pytest.raises(UserError, match="3 chosen and 3 rejected"):
        run(model_dir, tmp_path, "--benchmark", "rm-bench", "--dataset", bad)


def test_rendering_is_the_transcript_or_the_chat_template(model_dir, tmp_path, capsys):
    """Real rewards: without a chat template each response is scored as score() scores "\\n\\nHuman: " + prompt
    + "\\n\\nAssistant: " + response; with one, as score() scores [user prompt, assistant response]."""
    rows = [{"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
             "rejected": "Let me think about it.", "subset": "alpacaeval-easy", "id": 7}]
    path = tmp_path / "rb.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    model = RewardModel.from_pretrained(str(model_dir))
    run(model_dir, tmp_path, "--benchmark", "rewardbench", "--dataset", path, "--show", 1)
    line = json.loads((tmp_path / "out" / "benchmark_rewards.jsonl").read_text())
    texts = [f"\n\nHuman: {rows[0]['prompt']}\n\nAssistant: {rows[0][k]}" for k in ("chosen", "rejected")]
    assert line["chosen"] + line["rejected"] == pytest.approx(model.score(texts, max_length=64), abs=1e-5)
    assert texts[0] in capsys.readouterr().out  # --show 1
    # a model with a chat template (test_chat's Qwen3 template and BPE tokenizer)
    chat_dir = make_model_dir(tmp_path / "chat")
    from support.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(str(chat_dir))
    config = dataclasses.replace(SHAPES["tiny"], vocab_size=512)
    torch.manual_seed(1)
    chat_model = RewardModel(config)
    chat_model.model.init_weights(seed=1)
    chat_model.init_head(1)
    chat_model.tokenizer = tok
    chat_model.save_pretrained(tmp_path / "chat_model")
    report = run(tmp_path / "chat_model", tmp_path, "--benchmark", "rewardbench", "--dataset", path, "--show", 1)
    assert report["benchmark"]["rendering"] == "chat template"
    line = json.loads((tmp_path / "out" / "benchmark_rewards.jsonl").read_text())
    convs = [[{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0][k]}]
             for k in ("chosen", "rejected")]
    assert line["chosen"] + line["rejected"] == pytest.approx(chat_model.score(convs, max_length=1024), abs=1e-5)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in capsys.readouterr().out
    # --chat_template none: the transcript again
    report = run(tmp_path / "chat_model", tmp_path, "--benchmark", "rewardbench", "--dataset", path,
                 "--chat_template", "none")
    assert report["benchmark"]["rendering"] == "hh-rlhf transcript"
    line = json.loads((tmp_path / "out" / "benchmark_rewards.jsonl").read_text())
    assert line["chosen"] + line["rejected"] == pytest.approx(chat_model.score(texts, max_length=1024), abs=1e-5)


def test_rewardbench2_parquet_rows_are_measured_with_their_lists(model_dir, tmp_path, monkeypatch):
    """A parquet row's list<string> responses count toward the row cap (skipped as too large, never scored)."""
    from support import readers
    monkeypatch.setattr(RewardModel, "score_responses", planted)
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 2000)
    rows = [{"id": str(i), "prompt": "p", "chosen": ["r=2"], "rejected": ["r=1", "r=0", "r=1" + " " * big],
             "num_correct": 1, "num_incorrect": 3, "total_completions": 4, "models": ["m"] * 4,
             "subset": "Math", "additional_metadata": "{}"} for i, big in enumerate((0, 5000, 0))]
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    bench = run(model_dir, tmp_path, "--benchmark", "rewardbench2", "--dataset", path)["benchmark"]
    assert bench["skipped"] == {"row too large": 1} and bench["subsets"] == {"Math": {"score": 1.0, "n": 2}}


# ---- against the official package's own code (rewardbench==0.1.4, installed with --no-deps) -----------


@pytest.fixture(scope="module")
def official():
    """rewardbench's constants.py and the pure functions of its utils.py, loaded from the installed files
    without importing the package (its __init__ pulls datasets, fastchat, transformers...)."""
    import ast
    import importlib.util
    import math
    import types
    import numpy as np
    spec = importlib.util.find_spec("rewardbench")  # a top-level package: found, not imported
    if spec is None:
        pytest.skip("the official package is not installed: pip install --no-deps rewardbench==0.1.4 (.ci/run does)")
    package = pathlib.Path(spec.submodule_search_locations[0])
    constants = importlib.util.spec_from_file_location("rewardbench_constants", package / "constants.py")
    module = importlib.util.module_from_spec(constants)
    constants.loader.exec_module(module)
    wanted = {"calculate_scores_per_section", "sample_stats", "process_single_model"}
    tree = ast.parse((package / "utils.py").read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {f.name for f in functions} == wanted
    # RewardBench 2's per-example result, the two statements of reroll_and_score_dataset that compute it (the
    # rest of that function is pandas plumbing): max_val = np.max(scores); new_row["results"] = ...
    reroll = next(node for node in tree.body if getattr(node, "name", "") == "reroll_and_score_dataset")
    statements = [node for node in ast.walk(reroll) if isinstance(node, ast.Assign) and ast.unparse(node.targets[0])
                  in ("max_val", "new_row['results']")]
    assert [ast.unparse(node.targets[0]) for node in statements] == ["max_val", "new_row['results']"]
    row_result = ast.parse("def best_of_n_row(scores):\n    new_row = {}\n    return new_row['results']").body[0]
    row_result.body[1:1] = statements
    namespace = {"np": np, "math": math, "Dataset": types.SimpleNamespace(from_dict=lambda d: d)}
    exec(compile(ast.fix_missing_locations(ast.Module(body=functions + [row_result], type_ignores=[])),
                 str(package / "utils.py"), "exec"), namespace)
    return types.SimpleNamespace(constants=module, best_of_n_row=namespace["best_of_n_row"],
                                 **{name: namespace[name] for name in wanted})


def test_rewardbench_weights_and_sections_are_the_official_packages(official):
    """Our EXAMPLE_COUNTS and sections are the package's (xstest-should-refuse 154, -should-respond 250), and
    on random results tables, with only some subsets present (a section weighs only the subsets in the file,
    one with none scores 0), our sections equal calculate_scores_per_section's."""
    import random
    assert benchmarks.EXAMPLE_COUNTS == official.constants.EXAMPLE_COUNTS
    assert benchmarks.SECTIONS == official.constants.SUBSET_MAPPING
    rng = random.Random(0)
    for trial in range(30):
        present = rng.sample(ALL_SUBSETS, rng.randint(1, len(ALL_SUBSETS)))
        examples, rewards = [], []
        for subset in present + ["anthropic_helpful"] * (trial % 2):
            for k in range(rng.randint(1, 5)):
                examples.append(benchmarks.Example(str(len(examples)), subset, "p", ["c"], ["r"]))
                rewards.append(([float(rng.randint(0, 3))], [float(rng.randint(0, 3))]))  # ties lose
        ours = benchmarks.rewardbench_scores(examples, rewards)
        metrics = {s: v["score"] for s, v in ours["subsets"].items()}
        theirs = official.calculate_scores_per_section(official.constants.EXAMPLE_COUNTS,
                                                       official.constants.SUBSET_MAPPING, metrics)
        assert ours["sections"] == pytest.approx(theirs, abs=1e-12)
        assert ours["score"] == pytest.approx(sum(theirs.values()) / 4, abs=1e-12)


def test_rewardbench2_ties_equals_the_official_process_single_model(official):
    """Random Ties tables (small whole-number rewards: zero gaps and equal correct rewards are common;
    prompts with a ref only, a tied only, or both) score as process_single_model scores them."""
    import random
    rng = random.Random(1)
    for trial in range(40):
        examples, rewards, rows = [], [], []
        for prompt in range(rng.randint(1, 8)):
            kinds = rng.choice([("ref",), ("tied",), ("ref", "tied"), ("ref", "tied")])
            for kind in kinds:
                n_correct = 1 if kind == "ref" else rng.randint(2, 3)
                scores = [float(rng.randint(0, 4)) for _ in range(n_correct + rng.randint(1, 3))]
                examples.append(benchmarks.Example(f"{kind}:{prompt}", "Ties", "p", ["c"] * n_correct,
                                                   ["r"] * (len(scores) - n_correct), n_correct))
                rewards.append((scores[:n_correct], scores[n_correct:]))
                rows.append({"id": f"{kind}:{prompt}", "scores": scores, "num_correct": n_correct})
        _, theirs = official.process_single_model(rows)
        assert benchmarks.ties_score(examples, rewards) == pytest.approx(float(theirs), abs=1e-12), rows


def test_rewardbench2_best_of_n_equals_the_official_row_result(official):
    """Random score lists with many ties (1/k when the first is tied with k - 1 others for the best, else 0)
    as reroll_and_score_dataset's own expression scores them."""
    import random
    rng = random.Random(2)
    for _ in range(300):
        scores = [float(rng.randint(0, 3)) for _ in range(rng.randint(2, 6))]
        chosen = rng.randint(1, len(scores) - 1)
        assert benchmarks.best_of_n(scores[:chosen], scores[chosen:]) == pytest.approx(
            float(official.best_of_n_row(scores)), abs=1e-12), scores


def test_ties_zero_gap_is_not_accurate_and_style_ties_lose():
    """A Ties prompt whose worst correct answer only equals the best incorrect one is not accurate; an RM-Bench
    style pair with equal rewards is a loss, not a win."""
    ref = benchmarks.Example("ref:1", "Ties", "p", ["c"], ["r", "r"], 1)
    assert benchmarks.ties_score([ref], [([1.0], [1.0, 0.0])]) == 0.0
    assert benchmarks.ties_score([ref], [([1.5], [1.0, 0.0])]) == pytest.approx(0.3)
    tie = benchmarks.Example("0", "chat", "p", ["a"] * 3, ["b"] * 3)
    assert benchmarks.rm_bench_scores([tie], [([1.0] * 3, [1.0] * 3)])["score"] == 0.0
    assert benchmarks.style_accuracies([([1.0] * 3, [1.0] * 3)]) == {"hard": 0.0, "normal": 0.0, "easy": 0.0}


def test_only_the_benchmarks_own_subsets_and_domains_count(model_dir, tmp_path, monkeypatch):
    """RewardBench 2's overall averages its six subsets only; RM-Bench's domains are exact names ("chatty" is
    not chat): others are skipped and counted."""
    monkeypatch.setattr(RewardModel, "score_responses", planted)
    rows = [{"id": str(i), "prompt": "p", "chosen": ["r=2"], "rejected": ["r=1"] if i else ["r=3"], "num_correct": 1,
             "subset": subset} for i, subset in enumerate(["Factuality", "Factuality", "Bogus", "ties"])]
    path = tmp_path / "rb2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = run(model_dir, tmp_path, "--benchmark", "rewardbench2", "--dataset", path)["benchmark"]
    assert bench["score"] == 0.5 and set(bench["subsets"]) == {"Factuality"}
    assert bench["skipped"] == {"subset not in RewardBench 2": 2} and bench["examples"] == 2
    wins = {"chosen": ["r=5"] * 3, "rejected": ["r=0"] * 3}
    rm_rows = [{"id": 0, "prompt": "p", "domain": "chat", "chosen": ["r=0"] * 3, "rejected": ["r=1"] * 3},
               {"id": 1, "prompt": "p", "domain": "chatty", **wins}, {"id": 2, "prompt": "p", "domain": "safety", **wins},
               {"id": 3, "prompt": "p", "domain": "safety-refuse", **wins}]
    path = tmp_path / "total_dataset.json"
    path.write_text(json.dumps(rm_rows))
    bench = run(model_dir, tmp_path, "--benchmark", "rm-bench", "--dataset", path)["benchmark"]
    assert bench["sections"]["chat"] == 0.0 and bench["sections"]["safety"] == 1.0 and bench["score"] == 0.5
    assert bench["skipped"] == {"domain not in RM-Bench": 2} and set(bench["subsets"]) == {"chat", "safety-refuse"}


def test_schema_errors_come_before_any_scoring(model_dir, tmp_path, monkeypatch):
    """A duplicate or malformed Ties id and an RM-Bench example without 3 styles are refused before the first
    example is scored (scoring 400 examples took 50 s before the error)."""
    def never(*args, **kwargs):
        raise AssertionError("scored before the schema was checked")
    monkeypatch.setattr(RewardModel, "score_responses", never)

    def ties(id_, correct=2):
        return {"id": id_, "prompt": "p", "chosen": ["r=1"] * correct, "rejected": ["r=0"], "num_correct": correct,
                "subset": "Ties"}
    cases = {"appears twice": [ties("ref:1", 1), ties("tied:1"), ties("tied:1")],
             "is not ref:N or tied:N": [ties("1")], "single correct response": [ties("ref:1", 1), ties("tied:1", 1)]}
    for words, rows in cases.items():
        path = tmp_path / "rb2.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(UserError, match=words):
            run(model_dir, tmp_path, "--benchmark", "rewardbench2", "--dataset", path)
    path = tmp_path / "rm.json"
    path.write_text(json.dumps([{"id": 0, "prompt": "p", "chosen": ["r=1"] * 3, "rejected": ["r=0"] * 3,
                                 "domain": "chat"}] * 50 + [{"id": 9, "prompt": "p", "chosen": ["r=1"] * 2,
                                                             "rejected": ["r=0"] * 2, "domain": "chat"}]))
    with pytest.raises(UserError, match="RM-Bench example 9 does not have 3 chosen and 3 rejected"):
        run(model_dir, tmp_path, "--benchmark", "rm-bench", "--dataset", path)


def test_examples_cut_as_they_are_read_score_the_same(model_dir, tmp_path):
    """cut_example keeps each text's last char_cap(max_length) characters as it is read (what a file can make
    --benchmark keep is bounded: 200 rows of 15 MiB took it to 3.6 GB); the rewards are those of the whole
    texts: as a transcript, with Qwen3's chat template, and with a template that trims (where the cut would
    change the rendering, so the example stays whole)."""
    from support.tokenizer import Tokenizer
    words = "The capital of France is Paris. What is the capital of France? Let me think about it. "
    long = words * 40
    rows = [{"prompt": long, "chosen": "Paris.", "rejected": "Lyon. " + long, "subset": "alpacaeval-easy", "id": 1},
            {"prompt": [{"role": "user", "content": long}, {"role": "assistant", "content": "Hm. " + long},
                        {"role": "user", "content": "So?"}], "chosen": "Paris.", "rejected": "Rome.",
             "subset": "alpacaeval-easy", "id": 2},
            {"prompt": "Hi", "chosen": "x" + " " * len(long) + "Paris.", "rejected": "Rome.",
             "subset": "alpacaeval-easy", "id": 3}]
    path = tmp_path / "rb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat_model = RewardModel(dataclasses.replace(SHAPES["tiny"], vocab_size=512))
    chat_model.model.init_weights(seed=1)
    chat_model.init_head(1)
    chat_model.tokenizer = Tokenizer.from_dir(str(make_model_dir(tmp_path / "chat")))
    trim = "{% for m in messages %}{{ m.content | trim }}|{% endfor %}"
    max_length = 16
    for model, template in ((RewardModel.from_pretrained(str(model_dir)), None), (chat_model, "qwen3"),
                            (chat_model, trim)):
        if template == trim:
            model.tokenizer.chat_template = trim
        cap = model.tokenizer.char_cap(max_length)
        assert cap < len(long)  # the test can fail: the texts are longer than what scoring reads
        render = (lambda prompt, r: model.tokenizer.chat_format().render(  # noqa: E731
            benchmarks.chat_prompt(prompt) + [{"role": "assistant", "content": r}])) if template else None
        whole = benchmarks.read_examples("rewardbench", str(path), {})
        cut = benchmarks.read_examples("rewardbench", str(path), {}, lambda e: benchmarks.cut_example(e, cap, render))
        assert max(len(cut[0].prompt), len(cut[0].rejected[0]), len(cut[1].prompt[0]["content"])) <= cap
        assert (cut[2] == whole[2]) == (template == trim)  # trimmed: the cut would change the rendering
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny: one thread is 10x faster on a busy machine
        try:
            scores = [benchmarks.score_examples(model, examples, bool(template), max_length, progress=False)
                      for examples in (whole, cut)]
        finally:
            torch.set_num_threads(threads)
        assert scores[0] == scores[1], template


def test_what_a_benchmark_file_can_make_eval_keep_is_bounded(tmp_path):
    """32 rows whose prompt and responses are the same 1 MiB text, in a 100 KB .jsonl.gz: cut as read, the
    examples keep rows x char_cap (tracemalloc), not rows x 3 MiB."""
    import gzip
    import tracemalloc
    big, cap, n = "a" * (1 << 20), 1000, 32
    line = {"prompt": big, "chosen": big + "b", "rejected": big, "subset": "alpacaeval-easy", "id": 1}
    path = tmp_path / "rb.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(line) + "\n").encode()) * n)  # gzip members: n lines
    tracemalloc.start()
    try:
        examples = benchmarks.read_examples("rewardbench", str(path), {}, lambda e: benchmarks.cut_example(e, cap))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(examples) == n and examples[0].chosen == [big[-cap + 1:] + "b"]
    assert kept < 2 << 20 and peak < 32 << 20, (kept, peak)  # whole: 96 MiB kept


def test_an_existing_report_has_one_size_limit_checked_before_scoring(model_dir, tmp_path, monkeypatch):
    """An existing 20 MiB evaluation_report.json was accepted at the start (64 MiB), then refused after scoring
    by a 16 MiB config limit, advising to "re-download the checkpoint": now one limit (report.MAX_REPORT_BYTES),
    the 20 MiB report gains its benchmark entry, and one over the limit is refused before anything is scored."""
    from support import report as report_files
    monkeypatch.setattr(RewardModel, "score_responses", planted)
    path = tmp_path / "rb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rewardbench_rows()))
    existing = tmp_path / "out" / "evaluation_report.json"
    existing.parent.mkdir()
    padding = "x" * (20 << 20)
    existing.write_text(json.dumps({"accuracy": 0.5, "counts": {}, "per_source": {}, "notes": padding}))
    report = run(model_dir, tmp_path, "--benchmark", "rewardbench", "--dataset", path)
    assert report["notes"] == padding and report["benchmark"]["examples"] == 48
    assert json.loads(existing.read_text())["benchmark"] == report["benchmark"]
    with existing.open("a") as f:  # still JSON-shaped or not, it is refused by its size alone, first
        f.truncate(report_files.MAX_REPORT_BYTES + 1)
    monkeypatch.setattr(RewardModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(UserError, match=r"evaluation_report.json exists and is 64 MiB, over the 64 MiB an evaluation "
                                        r"report may have; delete it or choose another --output$"):
        run(model_dir, tmp_path, "--benchmark", "rewardbench", "--dataset", path)


def test_a_disk_that_fills_while_scoring_is_one_line_and_writes_nothing(model_dir, tmp_path, monkeypatch):
    """--benchmark on a nearly full output disk: the up-front check passes (a 2-byte probe), then
    benchmark_rewards.jsonl does not fit. It was an ENOSPC traceback; now one line, and neither the rewards
    nor the report is left behind, whole or half. A real full tmpfs (opt-in: conftest.small_tmpfs)."""
    import errno
    from conftest import small_tmpfs
    monkeypatch.setattr(RewardModel, "score_responses", planted)
    rows = [{**row, "id": f"{i}-{row['id']}"} for i in range(15) for row in rewardbench_rows()]  # 720: ~50 KB
    path = tmp_path / "rb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with small_tmpfs(tmp_path / "small", "256k") as mnt:
        (mnt / "slack").write_bytes(b"s" * (24 << 10))
        with open(mnt / "fill", "wb", buffering=0) as f:
            with pytest.raises(OSError) as full:
                while True:
                    f.write(b"f" * 4096)
            assert full.value.errno == errno.ENOSPC
        (mnt / "slack").unlink()  # ~24 KB left: the probe and the report fit, the rewards do not
        out = mnt / "out"
        out.mkdir()
        with pytest.raises(UserError, match=r"^cannot write the report .*evaluation_report.json \(No space left on "
                                            r"device\); free space or choose another --output$"):
            eval_cli.main([str(model_dir), "--output", str(out / "evaluation_report.json"), "--no_progress",
                           "--device", "cpu", "--benchmark", "rewardbench", "--dataset", str(path)])
        assert os.listdir(out) == []
