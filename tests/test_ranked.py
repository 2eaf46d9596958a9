"""Ranked data (support/ranked.py, rm.listwise_loss / all_pairs_loss): the three layouts read with hand-counted
kept and skipped rows, K = 2 equal to pairs, shared-prompt group rewards equal to score(), the ranking metrics
against a hand computation."""
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

import data
from conftest import tiny_rm
from rm import all_pairs_loss, listwise_loss, pairwise_loss
from support import demo, ranked, readers

FIXTURES = Path(__file__).parent / "fixtures"


# ---- losses -------------------------------------------------------------------------------------

def grads(loss_fn, *leaves):
    for leaf in leaves:
        leaf.grad = None
    out = loss_fn()
    out["loss"].backward()
    return out, [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("loss", [listwise_loss, all_pairs_loss])
@pytest.mark.parametrize("chosen_first", [True, False])
def test_k2_groups_equal_pairwise_loss_and_gradients(loss, chosen_first):
    torch.manual_seed(0)
    c, r = (torch.randn(6, requires_grad=True) for _ in range(2))
    want, want_grads = grads(lambda: pairwise_loss(c, r), c, r)
    # the same pairs as groups of two, the responses in either order within each group
    order = (lambda a, b: (a, b)) if chosen_first else (lambda a, b: (b, a))

    def as_groups():
        rewards = torch.stack(order(c, r), 1).reshape(-1)
        level = torch.tensor(order(1.0, 0.0)).repeat(6)
        return loss(rewards, torch.arange(6).repeat_interleave(2), level, 6)
    got, got_grads = grads(as_groups, c, r)
    assert abs(got["loss"].item() - want["loss"].item()) < 1e-6
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(got_grads, want_grads))
    assert got["accuracy"].item() == pytest.approx(want["accuracy"].item())
    assert got["margin"].item() == pytest.approx(want["margin"].item(), abs=1e-6)


def test_all_pairs_on_one_group_equals_pairwise_on_its_expanded_pairs():
    torch.manual_seed(1)
    rewards = torch.randn(5, requires_grad=True)
    level = torch.tensor([2.0, 0.0, 3.0, 2.0, -1.0])  # a tie: the two 2.0s are no pair
    pairs = [(i, j) for i in range(5) for j in range(5) if level[i] > level[j]]
    assert len(pairs) == 9
    got, (g1,) = grads(lambda: all_pairs_loss(rewards, torch.zeros(5, dtype=torch.long), level, 1), rewards)
    want, (g2,) = grads(lambda: pairwise_loss(rewards[[i for i, _ in pairs]], rewards[[j for _, j in pairs]]), rewards)
    assert abs(got["loss"].item() - want["loss"].item()) < 1e-6 and (g1 - g2).abs().max() < 1e-6


def plackett_luce_by_hand(rewards: list, levels: list) -> float:
    """The tie rule written out: each response better than some other is picked from itself, its ties and
    everything below it."""
    nll = 0.0
    for i, (r, v) in enumerate(zip(rewards, levels)):
        if any(w < v for w in levels):
            nll -= r - math.log(sum(math.exp(s) for s, w in zip(rewards, levels) if w <= v))
    return nll


@pytest.mark.parametrize("levels", [[3, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 0], [5, 3, 3, 1, 1]])
def test_listwise_is_the_plackett_luce_likelihood_with_the_stated_tie_rule(levels):
    torch.manual_seed(2)
    rewards = torch.randn(len(levels))
    got = listwise_loss(rewards, torch.zeros(len(levels), dtype=torch.long), torch.tensor(levels, dtype=torch.float), 1)
    assert got["loss"].item() == pytest.approx(plackett_luce_by_hand(rewards.tolist(), levels), abs=1e-5)


def test_listwise_strict_ranking_is_the_product_of_softmax_picks_and_ignores_row_order():
    rewards, levels = [0.3, -1.0, 2.0], [1.0, 0.0, 2.0]  # ranking: 2, 0, 1
    by_hand = -(2.0 - math.log(sum(math.exp(r) for r in rewards)) + 0.3 - math.log(math.exp(0.3) + math.exp(-1.0)))
    for perm in itertools.permutations(range(3)):
        got = listwise_loss(torch.tensor([rewards[p] for p in perm]), torch.zeros(3, dtype=torch.long),
                            torch.tensor([levels[p] for p in perm]), 1)
        assert got["loss"].item() == pytest.approx(by_hand, abs=1e-6)


def test_group_losses_are_the_mean_over_groups_of_each_groups_loss():
    torch.manual_seed(3)
    r = torch.randn(7)
    g, lv = torch.tensor([0, 0, 0, 0, 1, 1, 1]), torch.tensor([3.0, 1, 2, 0, 0, 1, 1])
    for loss in (listwise_loss, all_pairs_loss):
        whole = loss(r, g, lv, 2)["loss"]
        parts = [loss(r[g == k], torch.zeros(int((g == k).sum()), dtype=torch.long), lv[g == k], 1)["loss"] for k in (0, 1)]
        assert whole.item() == pytest.approx(sum(parts).item() / 2, abs=1e-6)


# ---- reading the three layouts --------------------------------------------------------------------

@pytest.mark.parametrize("name,kept,skipped,levels", [
    ("ultrafeedback.jsonl", 2, {"single response": 1, "bad score": 1, "duplicate responses": 1,
                                "fewer than two levels": 1, "empty field": 1},
     [[8.0, 7.5, 7.5, 3.0], [9.0, 2.0]]),
    ("nectar.jsonl", 2, {"bad rank": 1, "duplicate responses": 1, "empty field": 1},
     [[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0], [-1.0, -2.0, -2.0]]),
    ("ranked_plain.jsonl", 3, {"mismatched lengths": 1, "bad score": 1, "single response": 1, "not a string": 1,
                               "fewer than two levels": 1}, [[2.0, 0.0, 1.0], [-1.0, -2.0], [1.5, 1.5, -1.0]]),
])
def test_fixture_layouts_hand_counted(name, kept, skipped, levels):
    stats = data.DataStats()
    groups = ranked.load_groups([str(FIXTURES / name)], "train", None, stats)
    assert (stats.read, stats.kept, stats.skipped) == (kept + sum(skipped.values()), kept, skipped)
    assert [g.levels for g in groups] == levels


def test_layout_texts_are_joined_as_pairs_are():
    uf, nectar, plain = (ranked.load_groups([str(FIXTURES / n)]) for n in
                         ("ultrafeedback.jsonl", "nectar.jsonl", "ranked_plain.jsonl"))
    # UltraFeedback without a chat template: the hh-rlhf transcript
    assert uf[0].prompt == "\n\nHuman: Name a primary colour.\n\nAssistant:" and uf[0].responses[0] == " Red."
    assert nectar[1].prompt == "\n\nHuman: Hi\n\nAssistant:" and nectar[1].responses == [" Hello.", " Hey.", " Yo."]
    assert plain[1].responses == [" Pear.", " Stone."]  # whole texts lose the prompt
    # a plain K = 2 row is the same pair as the prompt/chosen/rejected row
    pair = data.make_pair({"prompt": plain[1].prompt, "chosen": " Pear.", "rejected": " Stone."}, "x")
    assert (pair.prompt, pair.chosen, pair.rejected) == (plain[1].prompt, *plain[1].responses)


def test_ultrafeedback_parquet_with_its_nested_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in (FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    stats = data.DataStats()
    groups = ranked.load_groups([str(tmp_path / "train.parquet")], "train", None, stats)
    assert stats.kept == 2 and stats.read == 7 and groups[1].levels == [9.0, 2.0]


def test_ultrafeedback_with_a_chat_template_renders_a_user_turn():
    from support import chat
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    group = ranked.make_group({"instruction": "Hi?", "completions": [{"response": "Yes.", "overall_score": 2},
                                                                     {"response": "No.", "overall_score": 1}]},
                              "uf", chat.ChatFormat(template))
    assert group.prompt == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert group.responses == ["Yes.<|im_end|>\n", "No.<|im_end|>\n"] and not group.eos


def test_layouts_are_recognised_by_columns():
    assert readers.row_columns({"instruction": 1, "completions": 2, "x": 3}) == ["instruction", "completions"]
    assert readers.row_columns({"prompt": 1, "answers": 2, "turns": 1}) == ["prompt", "answers"]
    assert readers.row_columns({"prompt": 1, "responses": 2, "ranks": 3}) == ["prompt", "responses", "ranks"]
    assert readers.row_columns({"prompt": 1, "chosen": 2, "rejected": 3}) == ["prompt", "chosen", "rejected"]


def test_binarising_rules():
    g = ranked.Group("P", ["a", "b", "c", "d"], [1.0, 3.0, 0.0, 3.0], "s")
    assert [(p.chosen, p.rejected) for p in ranked.binarise([g], "all", 0)] == [
        ("a", "c"), ("b", "a"), ("b", "c"), ("d", "a"), ("d", "c")]
    worst = {(p.chosen, p.rejected) for seed in range(20) for p in ranked.binarise([g], "best_vs_worst", seed)}
    assert worst == {("b", "c"), ("d", "c")}  # the tied best broken at random, never by position
    rand = {(p.chosen, p.rejected) for seed in range(40) for p in ranked.binarise([g], "best_vs_random", seed)}
    assert rand == {(b, w) for b in "bd" for w in "ac"}
    assert ranked.binarise([g], "best_vs_random", 5) == ranked.binarise([g], "best_vs_random", 5)  # seeded


def test_held_out_share_holds_out_whole_groups():
    groups = ranked.load_groups(["demo_ranked"], "train", 400)
    train, held = ranked.split_held_out(groups, 0.2)
    assert 40 < len(held) < 120 and len(train) + len(held) == 400
    keys = {ranked.group_key(g) for g in held}
    assert not keys & {ranked.group_key(g) for g in train}
    # a group of two from a pair row has the pair's key: the same split as the pairs'
    pair = data.Pair("p", "c", "r")
    assert ranked.group_key(ranked.Group("p", ["c", "r"], [1.0, 0.0])) == data.pair_key(pair)


# ---- tokenising and batching ----------------------------------------------------------------------

def test_k2_group_tokenises_as_the_pair(demo_tok):
    pairs = data.load_pairs("demo", "train", 50)
    groups = [ranked.Group(p.prompt, [p.rejected, p.chosen], [0.0, 1.0], p.source) for p in pairs]
    items_p = data.tokenize_pairs(pairs, demo_tok, 24)
    stats = data.DataStats()
    items_g = ranked.tokenize_groups(groups, demo_tok, 24, stats)
    assert len(items_p) == len(items_g) and stats.truncated_prompt > 0 and stats.dropped_too_long > 0
    assert all([p.rejected_ids, p.chosen_ids] == g.ids for p, g in zip(items_p, items_g))


def test_a_response_that_does_not_fit_is_dropped_and_counted(demo_tok):
    g = ranked.Group("\n\nHuman: hi\n\nAssistant:", [" sure!", " sure! " + "great question! " * 20, " ugh."],
                     [2.0, 1.0, 0.0])
    stats = data.DataStats()
    (item,) = ranked.tokenize_groups([g], demo_tok, 16, stats)
    assert item.levels == [2.0, 0.0] and stats.dropped_responses == 1 and stats.dropped_too_long == 0
    assert item.prompt_len + item.response_lens[0] + 1 == len(item.ids[0])
    g.levels = [2.0, 2.0, 0.0]  # the only worse one is too long: fewer than two levels left
    g.responses = [" sure!", " ugh.", " sure! " + "great question! " * 20]
    assert ranked.tokenize_groups([g], demo_tok, 16, stats) == [] and stats.dropped_too_long == 1


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_group_batch_rewards_equal_score_of_each_text(demo_tok, pooling):
    """Padded, packed, and shared-prompt (padded and packed) batches of groups with mixed K."""
    model = tiny_rm(demo_tok, pooling=pooling)
    groups = ranked.load_groups(["demo_ranked"], "train", 5)
    groups[1].responses, groups[1].levels = groups[1].responses[:2], groups[1].levels[:2]  # mixed K
    groups[3].responses, groups[3].levels = groups[3].responses[:3], groups[3].levels[:3]
    items = ranked.tokenize_groups(groups, demo_tok, 128)
    want = torch.tensor(model.score([g.prompt + r for g in groups for r in g.responses]))
    for packed, share in itertools.product([False, True], [False, True]):
        batch = ranked.collate_groups(items, demo_tok.pad_id, packed=packed, share_prompt=share)
        with torch.no_grad():
            got = model(batch.input_ids, batch.attention_mask, batch.layout)
        assert (got - want).abs().max() < 1e-5, (packed, share)
        assert batch.group.tolist() == [k for k, g in enumerate(groups) for _ in g.responses]
        if share:  # each prompt once: fewer tokens than the sequences hold
            assert batch.input_ids.numel() < sum(it.tokens for it in items)


# ---- the ranking metrics ----------------------------------------------------------------------------

def test_ranking_report_by_hand():
    from eval import wilson_interval
    rewards = [[0.9, 0.1, 0.5], [1.0, 1.0, 0.0], [0.2, 0.2]]
    levels = [[3, 1, 2], [1, 0, 1], [1, 0]]
    got = ranked.ranking_report(rewards, levels, wilson_interval)
    # pairs: group 0: (0>1),(0>2),(2>1) all right: 3/3; group 1: (0>1) a reward tie, wrong; (2>1) wrong
    # (0.0 < 1.0): 0/2; group 2: a tie is wrong: 0/1 -> 3/6
    assert (got["pairs"], got["groups"]) == (6, 3) and got["pairwise_accuracy"] == pytest.approx(3 / 6)
    assert got["pairwise_accuracy_ci95"] == pytest.approx(list(wilson_interval(3, 6)))
    # top1: group 0: 1; group 1: responses 0 and 1 share the max, of which 0 has the best level: 1/2;
    # group 2: both at the max, one best: 1/2
    assert got["top1_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    # tau-b: group 0: 3 concordant of 3 -> 1; group 1: rewards (1,1,0), levels (1,0,1): pairs (0,1): r tie,
    # (0,2): +1 vs 0 level tie, (1,2): r +1, level -1 -> discordant: C-D = -1, n0-n1 = 2, n0-n2 = 2 -> -0.5;
    # group 2: rewards all tied: undefined
    assert got["kendall_tau"] == pytest.approx((1 - 0.5) / 2)
    assert ranked.kendall_tau_b([0.2, 0.2], [1, 0]) is None


def test_inspect_data_shows_ranked_groups_as_the_model_reads_them(demo_tok, tmp_path, capsys):
    from tools import inspect_data
    demo_tok.save(str(tmp_path / "tok"))
    inspect_data.main(["demo_ranked", "--model", str(tmp_path / "tok"), "--max-samples", "3", "--show", "1",
                       "--max_length", "40"])
    out = capsys.readouterr().out
    assert "--- group 1 (demo_ranked, 4 responses" in out and "response 4 (level " in out and " tokens)" in out
    report = json.loads(out[out.index("{"):out.index("peak RSS")])
    assert (report["read"], report["kept"], report["tokenized"]) == (3, 3, 3)
    assert "dropped_responses" in report


# ---- training and evaluation on ranked data -----------------------------------------------------------

def run_cfg(tmp_path, name, **kw):
    from train import RUN_CONFIGS, TrainConfig
    base = {**RUN_CONFIGS["demo"], "max_train_samples": 24, "max_eval_samples": 8, "batch_size": 4, "max_steps": 3,
            "eval_steps": 1000, "save_steps": 1000, "logging_steps": 1, "warmup_ratio": 0.0,
            "output_dir": str(tmp_path / name), "progress": False}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", ["listwise", "all_pairs"])
def test_trains_from_each_layout(tmp_path, loss, capsys):
    from train import train
    for name, kept in (("ultrafeedback.jsonl", 2), ("nectar.jsonl", 2), ("ranked_plain.jsonl", 3)):
        result = train(run_cfg(tmp_path, f"{loss}-{name}", dataset=[str(FIXTURES / name)], loss=loss,
                               eval_split="none", batch_size=2, max_steps=2))
        assert result["step"] == 2 and (tmp_path / f"{loss}-{name}" / "final_model" / "model.safetensors").is_file()
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
        assert line.startswith(f"data: {kept} training pairs, 0 eval pairs") and f" read, {kept} kept" in line


def test_k2_groups_train_exactly_as_pairs(tmp_path):
    """The demo's pairs as groups of two (--loss listwise / all_pairs) end with the weights of --loss pairwise
    (lr 1e-4: AdamW's first steps amplify rounding noise in near-zero gradients at the demo's 1e-3)."""
    from train import train
    from safetensors.torch import load_file
    runs = {}
    for name, kw in {"pairwise": {}, "listwise": {"loss": "listwise"}, "all_pairs": {"loss": "all_pairs"},
                     "listwise_shared": {"loss": "listwise", "share_prompt": True}}.items():
        train(run_cfg(tmp_path, name, learning_rate=1e-4, **kw))
        runs[name] = load_file(str(tmp_path / name / "final_model" / "model.safetensors"))
    first = load_file(str(tmp_path / "pairwise" / "final_model" / "model.safetensors"))
    for name, weights in runs.items():
        assert max((weights[k] - first[k]).abs().max().item() for k in first) < 1e-5, name
    report = json.loads((tmp_path / "listwise" / "evaluation_report.json").read_text())
    assert report["ranking"]["pairs"] == report["num_pairs"] == 8  # held-out pairs as groups of two


def test_pairwise_on_ranked_rows_binarises_and_counts_pairs(tmp_path, capsys):
    from train import train
    train(run_cfg(tmp_path, "b", dataset=["demo_ranked"], pairs_from_ranked="all", max_steps=1))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
    assert line.startswith("data: 144 training pairs, 8 eval pairs") and " 24 kept" in line  # 24 groups x 6


@pytest.mark.parametrize("flags,message", [
    (dict(loss="listwise", center_rewards_coefficient=0.1), "--center_rewards_coefficient applies to --loss pairwise"),
    (dict(loss="all_pairs", pairs_from_ranked="all"), "--pairs_from_ranked binarises ranked rows for --loss pairwise"),
])
def test_options_that_do_not_apply_are_refused_in_one_line(tmp_path, flags, message):
    from support.errors import UserError
    from train import train
    with pytest.raises(UserError, match=re.escape(message)):
        train(run_cfg(tmp_path, "x", dataset=["demo_ranked"], **flags))


def test_eval_ranking_entry_matches_a_hand_computation_from_score(tmp_path, demo_tok, capsys):
    import eval as eval_cli
    model = tiny_rm(demo_tok, pooling="last", seed=3)
    model.save_pretrained(tmp_path / "model")
    rows = list(itertools.islice(demo.demo_ranked_rows("test"), 6))
    rows[1] = {**rows[1], "responses": rows[1]["responses"][:3], "scores": [1, 1, 0]}  # a tie, K = 3
    rows[2] = {"prompt": rows[2]["prompt"], "responses": rows[2]["responses"][:2], "ranks": [2, 1]}  # ranks
    (tmp_path / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = eval_cli.main([str(tmp_path / "model"), "--dataset", str(tmp_path / "ranked.jsonl"), "--split", "train",
                            "--max_length", "128", "--no_progress", "--output", str(tmp_path / "out") + "/"])
    assert "ranking: 6 groups, " in capsys.readouterr().out  # the table's ranking line
    rewards = [model.score([r["prompt"] + x for x in r["responses"]]) for r in rows]
    levels = [r["scores"] if "scores" in r else [-v for v in r["ranks"]] for r in rows]
    pairs = [(r[i] > r[j]) for r, v in zip(rewards, levels) for i in range(len(v)) for j in range(len(v)) if v[i] > v[j]]
    top1 = [sum(1 for x, w in zip(r, v) if x == max(r) and w == max(v)) / sum(1 for x in r if x == max(r))
            for r, v in zip(rewards, levels)]

    def tau(r, v):
        s = lambda a: (a > 0) - (a < 0)  # noqa: E731
        ps = [(s(r[i] - r[j]), s(v[i] - v[j])) for i in range(len(r)) for j in range(i + 1, len(r))]
        denom = math.sqrt(sum(a != 0 for a, _ in ps) * sum(b != 0 for _, b in ps))
        return sum(a * b for a, b in ps) / denom
    ranking = report["ranking"]
    assert (ranking["groups"], ranking["pairs"]) == (6, len(pairs))
    assert ranking["pairwise_accuracy"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert ranking["top1_accuracy"] == pytest.approx(sum(top1) / 6, abs=1e-12)
    assert ranking["kendall_tau"] == pytest.approx(sum(tau(r, v) for r, v in zip(rewards, levels)) / 6, abs=1e-6)
    assert len(ranking["pairwise_accuracy_ci95"]) == 2 and report["accuracy"] == ranking["pairwise_accuracy"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "ranking_rewards.jsonl").read_text().splitlines()]
    assert sorted(json.dumps(x["levels"]) for x in lines) == sorted(json.dumps([float(v) for v in lv]) for lv in levels)
    for line in lines:  # the rewards in the row's order, equal to score() of each whole text (1e-5)
        want = rewards[[[float(v) for v in lv] for lv in levels].index(line["levels"])]
        assert max(abs(a - b) for a, b in zip(line["rewards"], want)) < 1e-5


def test_groups_cut_as_they_are_read_give_the_same_ids_split_pairs_and_digest(tmp_path, demo_tok):
    """A ranked file's texts are cut as they are read (ranked.cut_group, as pairs' data.cut_texts; issue 30 §5): what
    is kept is bounded by what max_length can use, and the token ids, the held-out split, the binarised pairs and
    the data digest are those of the whole texts."""
    from support.demo import demo_ranked_rows
    max_length = 64
    cap = demo_tok.char_cap(max_length)
    rows = list(itertools.islice(demo_ranked_rows("train"), 40))
    for i, row in enumerate(rows):  # long prompts (cut from the left), and responses that cannot fit (dropped)
        if i % 3 == 0:
            row["prompt"] = row["prompt"] * (3 * cap // len(row["prompt"]) + 1)
        if i % 4 == 1:
            row["responses"][i % len(row["responses"])] *= 3 * cap // len(row["responses"][0]) + 1
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = ranked.load_groups([str(path)], "train", stats=data.DataStats())
    cut = ranked.load_groups([str(path)], "train", stats=data.DataStats(), char_cap=cap)
    assert max(len(t) for g in cut for t in (g.prompt, *g.responses)) <= cap + 1 < 3 * cap
    assert max(len(t) for g in whole for t in (g.prompt, *g.responses)) > 3 * cap
    assert sum(g.key_hash is not None for g in cut) >= 10
    stats = [data.DataStats(), data.DataStats()]
    assert ranked.tokenize_groups(cut, demo_tok, max_length, stats[0]) == \
        ranked.tokenize_groups(whole, demo_tok, max_length, stats[1])
    assert stats[0].report() == stats[1].report() and stats[0].dropped_responses > 0
    assert [ranked.group_hash(g) for g in ranked.split_held_out(cut, 0.5)[1]] == \
        [ranked.group_hash(g) for g in ranked.split_held_out(whole, 0.5)[1]]
    assert ranked.groups_digest(cut) == ranked.groups_digest(whole)
    for rule in ranked.PAIRS_FROM_RANKED:
        pairs = [data.tokenize_pairs(ranked.binarise(groups, rule, seed=7), demo_tok, max_length)
                 for groups in (cut, whole)]
        assert pairs[0] == pairs[1] and pairs[0], rule
