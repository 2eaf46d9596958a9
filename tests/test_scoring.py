"""Using a trained model (support/scoring.py): score_responses equals score, normalisation statistics saved in
config.json, TRL's reward function, and score()'s bounded tokenisation.

References: score() of each whole text alone (itself checked against forward and transformers in test_rm),
hand computations of the statistics, transformers loading the export."""
import copy
import functools
import json
import math
import subprocess
import sys

import pytest
import torch

import conftest
from conftest import ROOT
from support import packing, scoring
from support.errors import UserError
from rm import RewardModel
from test_chat import A1, SYSTEM, U1, make_model_dir

PROMPT = "\n\nHuman: What is the capital of France? Let me think about it step by step.\n\nAssistant:"
RESPONSES = [" The capital of France is Paris.", " Paris.", " Hello! How can I help you today?",
             " Let me think about it.", " The capital of France is Paris."]  # a duplicate too


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """test_chat's byte-level BPE with Qwen3's special tokens and chat template: merges cross word parts."""
    from support.tokenizer import Tokenizer
    return Tokenizer.from_dir(str(make_model_dir(tmp_path_factory.mktemp("bpe"))))


tiny_rm = functools.partial(conftest.tiny_rm, min_vocab=512)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_score_responses_equals_score_alone(bpe_tok, head, pooling):
    model = tiny_rm(bpe_tok, head, pooling)
    alone = [model.score([PROMPT + r])[0] for r in RESPONSES]
    shared = model.score_responses(PROMPT, RESPONSES)
    assert max(abs(a - b) for a, b in zip(alone, shared)) < 1e-5
    assert len(set(round(r, 6) for r in alone)) == 4  # distinct texts, distinct rewards: the test can fail
    assert model.score_responses(PROMPT, RESPONSES, batch_size=2) == pytest.approx(alone, abs=1e-5)
    # conversations: the prompt's messages, then each response as the assistant's turn
    conv = [SYSTEM, U1]
    alone = model.score([conv + [{"role": "assistant", "content": r}] for r in RESPONSES])
    assert model.score_responses(conv, RESPONSES) == pytest.approx(alone, abs=1e-5)
    as_messages = [{"role": "assistant", "content": r} for r in RESPONSES]
    assert model.score_responses(conv, as_messages) == pytest.approx(alone, abs=1e-5)


def test_scoring_length_is_one_rule(bpe_tok):
    """How many tokens every scoring path keeps (scoring.scoring_length): max_length when given, else the training
    max_length the model carries, else its max_position_embeddings. The paths themselves agree:
    test_serve.py::test_one_long_text_gets_one_reward_on_every_path."""
    model = tiny_rm(bpe_tok)
    assert scoring.scoring_length(model) == model.config.max_position_embeddings == 2048  # a model without one
    model.provenance = {"max_length": 48}
    assert (scoring.scoring_length(model), scoring.scoring_length(model, 16)) == (48, 16)
    text = PROMPT + " Paris is the capital." * 20
    assert model.score([text]) == model.score([text], max_length=48) != model.score([text], max_length=2048)


def test_prompt_is_computed_once_and_ids_are_the_whole_texts(bpe_tok):
    """The model's tokens hold the shared prefix once; each sequence is exactly the whole text's ids, also
    where the last prompt characters merge with the response's first ones (a token across the boundary)."""
    prompt, responses = "The capital of Fr", ["ance is Paris.", "ance?", "ench toast"]
    whole = [bpe_tok.sequence(prompt + r) for r in responses]
    apart = [bpe_tok.encode(prompt) + bpe_tok.encode(r) for r in responses]
    assert all(w[:-1] != a for w, a in zip(whole, apart))  # tokenising apart differs: the case matters
    for packed in (False, True):
        input_ids, layout = packing.collate_responses(whole, pad_id=bpe_tok.pad_id, packed=packed)
        n_shared = min(packing.shared_prefix_len(whole[0], w) for w in whole[1:])
        n_tokens = len(whole[0]) + sum(len(w) - n_shared for w in whole[1:])
        assert n_shared > 0 and input_ids.shape[1] == -(-n_tokens // 8) * 8  # the prefix once, padded to 8
        expanded = input_ids.reshape(-1)[layout.expand_index]
        for k, w in enumerate(whole):
            assert expanded[layout.sequence_ids == k].tolist() == w
    model = tiny_rm(bpe_tok)
    assert model.score_responses(prompt, responses) == pytest.approx(model.score([prompt + r for r in responses]),
                                                                     abs=1e-5)


def test_score_responses_runs_the_prompt_once_counted_through_the_model(bpe_tok):
    """Cost, not only equality: the tokens score_responses feeds the model (counted at the embeddings) are
    the prompt once per batch plus each response's own tokens, padded to a multiple of 8, far fewer than the
    whole texts'. Scoring the whole texts (the right rewards at N times the prompt's cost) fails this."""
    model, fed = tiny_rm(bpe_tok), []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: fed.append(args[0].numel()))
    whole = [bpe_tok.sequence(PROMPT + r) for r in RESPONSES]

    def prompt_once(seqs):  # tokens of one batch with the shared prefix once, padded to 8
        n_shared = min(packing.shared_prefix_len(seqs[0], w) for w in seqs[1:])
        return -(-(len(seqs[0]) + sum(len(w) - n_shared for w in seqs[1:])) // 8) * 8
    for batch_size in (16, 2):
        fed.clear()
        model.score_responses(PROMPT, RESPONSES, batch_size=batch_size)
        batches = [whole[i:i + batch_size] for i in range(0, len(whole), batch_size)]
        assert fed == [prompt_once(b) if len(b) > 1 else len(b[0]) for b in batches], batch_size
    assert fed[0] < sum(len(w) for w in whole[:2]) - 10  # the prompt (~20 tokens) runs once, not twice


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_packed_layout_equals_padded(bpe_tok, pooling):
    model = tiny_rm(bpe_tok, pooling=pooling)
    seqs = [bpe_tok.sequence(PROMPT + r) for r in RESPONSES]
    with torch.no_grad():
        padded_ids, layout = packing.collate_responses(seqs, bpe_tok.pad_id)
        padded = model(padded_ids, layout=layout)
        packed_ids, layout = packing.collate_responses(seqs, bpe_tok.pad_id, packed=True)
        packed = model(packed_ids, layout=layout)
    assert (padded - packed).abs().max() < 1e-5
    assert packed.tolist() == pytest.approx(model.score([PROMPT + r for r in RESPONSES]), abs=1e-5)


def test_wrong_kinds_of_responses_are_one_line(bpe_tok):
    model = tiny_rm(bpe_tok)
    with pytest.raises(UserError, match="string prompt takes string responses"):
        model.score_responses(PROMPT, [{"role": "assistant", "content": "x"}])
    with pytest.raises(UserError, match="a prompt is a string or a list"):
        model.score_responses(3, ["x"])
    assert model.score_responses(PROMPT, []) == []


# ----------------------------------------------------------------------------------------------
# Normalisation statistics


CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
# (call, what the error must say): each a mistake that gave a silent wrong answer or a bare Python error
BAD_CALLS = {
    "score(str)": (lambda m, d: m.score("one text"), "score: texts is one str, not a list"),
    "score(None)": (lambda m, d: m.score(None), "score: texts is NoneType; pass a list"),
    "score([int])": (lambda m, d: m.score(["ok", 3]), "score: texts[1] is int"),
    "score(one conversation)": (lambda m, d: m.score(CONVERSATION), "score: texts[0] is a message (a dict)"),
    "score(batch_size=-1)": (lambda m, d: m.score(["a"], batch_size=-1), "score: batch_size=-1 must be a whole"),
    "score(batch_size=0)": (lambda m, d: m.score(["a"], batch_size=0), "score: batch_size=0 must be a whole"),
    "score(batch_size=2.0)": (lambda m, d: m.score(["a"], batch_size=2.0), "batch_size=2.0 must be a whole"),
    "score(batch_size=True)": (lambda m, d: m.score(["a"], batch_size=True), "batch_size=True must be a whole"),
    "score(max_length=0)": (lambda m, d: m.score(["a"], max_length=0), "score: max_length=0 must be a whole number >= 2"),
    "score(max_length=-5)": (lambda m, d: m.score(["a"], max_length=-5), "max_length=-5 must be a whole number >= 2"),
    "score(max_length=1)": (lambda m, d: m.score(["a"], max_length=1), "max_length=1 must be a whole number >= 2"),
    "score(normalize='yes')": (lambda m, d: m.score(["a"], normalize="yes"), "normalize='yes' must be True or False"),
    "score(conversation, no template)": (lambda m, d: m.score([CONVERSATION]),
                                         "need a chat template and this model's tokenizer has none; give it one: "
                                         "model.tokenizer.chat_format(\"PATH\")"),
    "score_responses(str)": (lambda m, d: m.score_responses(PROMPT, " Paris."), "responses is one str, not a list"),
    "score_responses(None)": (lambda m, d: m.score_responses(PROMPT, None), "responses is NoneType"),
    "score_responses(batch_size=0)": (lambda m, d: m.score_responses(PROMPT, ["a"], batch_size=0), "batch_size=0"),
    "score_responses(max_length=0)": (lambda m, d: m.score_responses(PROMPT, ["a"], max_length=0), "max_length=0"),
    "reward_function(normalize='x')": (lambda m, d: m.reward_function(normalize="x"), "normalize='x' must be True"),
    "reward_function()(None, ...)": (lambda m, d: m.reward_function()(None, ["a"]), "prompts is NoneType"),
    "reward_function()(..., None)": (lambda m, d: m.reward_function()([PROMPT], None), "completions is NoneType"),
    "reward_function()(str, str)": (lambda m, d: m.reward_function()(PROMPT, " Paris."), "prompts is one str"),
    "from_pretrained(None)": (lambda m, d: RewardModel.from_pretrained(None), "name_or_path=None must be a directory"),
    "from_pretrained(dtype='float32')": (lambda m, d: RewardModel.from_pretrained(d, dtype="float32"),
                                         "dtype='float32' must be a floating-point torch dtype"),
    "from_pretrained(dtype=int8)": (lambda m, d: RewardModel.from_pretrained(d, dtype=torch.int8), "dtype=torch.int8"),
    "from_pretrained(device='gpu')": (lambda m, d: RewardModel.from_pretrained(d, device="gpu"),
                                      "device='gpu' is not a torch device"),
    "from_pretrained(head='x')": (lambda m, d: RewardModel.from_pretrained(d, head="x"), "head='x' is not one of"),
    "from_pretrained(seed='1')": (lambda m, d: RewardModel.from_pretrained(d, seed="1"), "seed='1' must be an int"),
    "save_pretrained(None)": (lambda m, d: m.save_pretrained(None), "out_dir=None must be a directory path"),
    "save_pretrained(extra_files=str)": (lambda m, d: m.save_pretrained(d.parent / "x", extra_files={"a": "text"}),
                                         "extra_files must be None or a dict"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bpe_tok):
    """A tiny model whose tokenizer has no chat template, and its saved directory."""
    model = tiny_rm(bpe_tok)
    model.tokenizer = copy.copy(bpe_tok)
    model.tokenizer.chat_template = None
    return model, model.save_pretrained(tmp_path_factory.mktemp("api") / "model")


@pytest.mark.parametrize("case", BAD_CALLS)
def test_public_api_refuses_bad_arguments_in_one_line(saved, case):
    """The public API checks its arguments: one UserError naming the argument and the fix, in Python terms
    (never a command-line flag), never a silent wrong answer (score("text") gave one reward per character,
    batch_size=-1 [0.0], max_length=0 no limit) nor an error from deep inside."""
    call, expected = BAD_CALLS[case]
    with pytest.raises(UserError) as e:
        call(*saved)
    assert expected in str(e.value) and "\n" not in str(e.value) and "--" not in str(e.value), str(e.value)
    assert not (saved[1].parent / "x").exists()


def test_public_api_takes_what_it_documents(saved):
    """The checks refuse nothing the API promises: tuples, numpy ints, a pathlib.Path, a torch.device; and
    help(RewardModel.score) shows the transcript format as written, "\\n\\nHuman: ..."."""
    import numpy as np
    model, path = saved
    assert model.score(("a", "b"), batch_size=np.int64(1), max_length=np.int32(8)) == \
        pytest.approx(model.score(["a", "b"], max_length=8), abs=1e-6)
    assert RewardModel.from_pretrained(path, device=torch.device("cpu"), seed=np.int64(0)).score(["a"]) == \
        pytest.approx(model.score(["a"]), abs=1e-6)
    assert '("\\n\\nHuman: ...\\n\\nAssistant: ...")' in RewardModel.score.__doc__
    # the fix the no-template error gives works: model.tokenizer.chat_format(PATH), then conversations score
    fresh = RewardModel.from_pretrained(path)
    (path.parent / "t.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    fresh.tokenizer.chat_format(str(path.parent / "t.jinja"))
    assert fresh.tokenizer.sequence(CONVERSATION) == fresh.tokenizer.encode("user: hi\nassistant: hello\n")
    assert len(fresh.score([CONVERSATION])) == 1


def test_stats_from_report_equal_stats_of_all_rewards():
    from eval import report_from_rewards
    chosen, rejected = [1.0, 2.5, -0.5, 3.0], [0.5, -1.0, 0.0, 2.0]
    report = report_from_rewards(chosen, rejected, [1] * 4, [1] * 4)
    got, want = scoring.stats_from_report(report), scoring.stats_of(chosen + rejected)
    by_hand_mean = 7.5 / 8
    by_hand_std = math.sqrt(sum((r - by_hand_mean) ** 2 for r in chosen + rejected) / 7)
    assert got["n"] == want["n"] == 8
    assert got["mean"] == pytest.approx(by_hand_mean) and want["mean"] == pytest.approx(by_hand_mean)
    assert got["std"] == pytest.approx(by_hand_std) and want["std"] == pytest.approx(by_hand_std)


def test_saved_stats_normalise_and_the_export_still_loads_in_transformers(tmp_path, bpe_tok):
    from transformers import AutoModelForSequenceClassification
    from eval import report_from_rewards
    model = tiny_rm(bpe_tok, "linear", "last")
    texts = [PROMPT + r for r in RESPONSES]
    raw = model.score(texts)
    with pytest.raises(UserError, match="needs the reward mean and std"):
        model.score(texts, normalize=True)
    with pytest.raises(UserError, match="needs the reward mean and std"):
        model.reward_function(normalize=True)
    model.save_pretrained(tmp_path / "rm")
    report = report_from_rewards([1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [1] * 3, [1] * 3)
    stats = scoring.save_reward_stats(tmp_path / "rm", report)
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["reward_model"]["reward_stats"] == stats and (saved["mean"], saved["std"]) == (stats["mean"], stats["std"])
    loaded = RewardModel.from_pretrained(str(tmp_path / "rm"))
    assert loaded.reward_stats == stats
    want = [(r - stats["mean"]) / stats["std"] for r in raw]
    assert loaded.score(texts, normalize=True) == pytest.approx(want, abs=1e-5)
    assert loaded.score_responses(PROMPT, RESPONSES, normalize=True) == pytest.approx(want, abs=1e-5)
    # saved again (train.py's checkpoints do), the statistics stay
    loaded.save_pretrained(tmp_path / "again")
    assert RewardModel.from_pretrained(str(tmp_path / "again")).reward_stats == stats
    # transformers ignores the extra keys: the same raw rewards
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = [bpe_tok.sequence(t) for t in texts]
    with torch.no_grad():
        hf_rewards = [hf(input_ids=torch.tensor([i])).logits[0, 0].item() for i in ids]
    assert hf_rewards == pytest.approx(raw, abs=1e-4)


@pytest.mark.parametrize("stats", [{"mean": 0.0, "std": 0.0, "n": 4}, {"mean": "x", "std": 1.0, "n": 4},
                                   {"mean": float("nan"), "std": 1.0, "n": 4}, {"mean": 0.0, "std": 1.0}, [1, 2]])
def test_bad_saved_stats_are_one_line(tmp_path, bpe_tok, stats):
    model = tiny_rm(bpe_tok)
    model.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    config["reward_model"]["reward_stats"] = stats
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="reward_stats"):
        RewardModel.from_pretrained(str(tmp_path / "rm"))


# ----------------------------------------------------------------------------------------------
# TRL's reward function


def test_reward_function_equals_score_on_joined_texts(bpe_tok):
    model = tiny_rm(bpe_tok)
    calls = []
    real = model.score_responses
    model.score_responses = lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    f = model.reward_function()
    other = "\n\nHuman: Hello!\n\nAssistant:"
    prompts = [PROMPT] * 3 + [other] + [PROMPT] * 2      # a group of 3, a lone prompt, a group of 2
    completions = RESPONSES[:3] + [" Sure."] + RESPONSES[3:5]
    want = model.score([p + c for p, c in zip(prompts, completions)])
    assert f(prompts, completions, completion_ids=None, trainer_state=None) == pytest.approx(want, abs=1e-5)
    assert calls == [3, 2]
    # conversational: prompts and completions as message lists
    conv_prompts = [[SYSTEM, U1]] * 2 + [[U1]]
    conv_completions = [[A1], [{"role": "assistant", "content": "Paris."}], [A1]]
    want = model.score([p + c for p, c in zip(conv_prompts, conv_completions)])
    assert f(conv_prompts, conv_completions) == pytest.approx(want, abs=1e-5)
    with pytest.raises(UserError, match="2 prompts but 1 completions"):
        f([PROMPT, PROMPT], ["x"])


def test_reward_function_normalises_lone_prompts_and_groups_alike(bpe_tok):
    """reward_function(normalize=True): a prompt with a single completion (scored through score) is
    normalised as a group's completions (through score_responses) are, by hand: (r - mean) / std."""
    model = tiny_rm(bpe_tok)
    model.provenance["reward_stats"] = {"mean": 0.75, "std": 4.0, "n": 10}
    other = "\n\nHuman: Hello!\n\nAssistant:"
    prompts, completions = [PROMPT, PROMPT, other], RESPONSES[:2] + [" Sure."]
    raw = model.score([p + c for p, c in zip(prompts, completions)])
    want = [(r - 0.75) / 4.0 for r in raw]
    assert model.reward_function(normalize=True)(prompts, completions) == pytest.approx(want, abs=1e-5)
    assert model.reward_function(normalize=True)([other], [" Sure."]) == pytest.approx(want[2:], abs=1e-5)
    assert abs(raw[2] - want[2]) > 0.1  # normalising moves it: the test can fail


# ----------------------------------------------------------------------------------------------
# score() tokenises a bounded part of a text (issue 21)


def test_long_text_keeps_the_end_exactly(bpe_tok):
    text = PROMPT * 200 + RESPONSES[0]
    whole = bpe_tok.encode(text)
    assert bpe_tok.sequence(text, 64) == (whole + bpe_tok.eos_suffix(whole))[-64:]
    conv = [U1, {**A1, "content": A1["content"] * 300}]
    full = bpe_tok.encode(bpe_tok.chat_format().render(conv))
    assert bpe_tok.sequence(conv, 64) == full[-64:]


def test_score_memory_is_bounded_for_a_5mb_text(tmp_path):
    """Peak memory while scoring a 5 MB text at max_length 64 (in a fresh process: the high-water mark
    is not shared with other tests). Before the bound the tokenizer took about +450 MB."""
    make_model_dir(tmp_path / "tok")
    script = f"""
import resource, sys, torch, dataclasses
sys.path.insert(0, {str(ROOT)!r})
from support.tokenizer import Tokenizer
from qwen3 import SHAPES
from rm import RewardModel
tok = Tokenizer.from_dir({str(tmp_path / 'tok')!r})
model = RewardModel(dataclasses.replace(SHAPES['tiny'], vocab_size=512)).eval()
model.tokenizer = tok
text = "The capital of France is Paris. " * (5 << 20 >> 5)
model.score(["warm up"], max_length=64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.score([text], max_length=64)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 60, f"peak grew by {out.stdout.strip()} MiB"


def test_train_and_eval_save_the_held_out_reward_stats(tmp_path):
    """train.py's final model and eval.py --save_reward_stats carry the statistics of the rewards in their
    report: the saved numbers are those the report's reward blocks give (stats_from_report, checked above)."""
    import eval as eval_cli
    from test_train import tiny_cfg
    from train import train
    train(tiny_cfg(tmp_path))
    report = json.loads((tmp_path / "run" / "evaluation_report.json").read_text())
    stats = scoring.stats_from_report(report)
    assert report["reward_stats"] == stats and stats["n"] == 2 * report["num_pairs"]
    assert RewardModel.from_pretrained(str(tmp_path / "run" / "final_model")).reward_stats == stats
    again = eval_cli.main([str(tmp_path / "run" / "final_model"), "--dataset", "demo", "--max_samples", "8",
                           "--save_reward_stats", "--output", str(tmp_path / "r.json"), "--no_progress"])
    saved = RewardModel.from_pretrained(str(tmp_path / "run" / "final_model")).reward_stats
    assert saved == again["reward_stats"] == scoring.stats_from_report(again) and saved["n"] == 16
    assert saved != stats


def test_a_disk_that_fills_before_the_stats_are_saved_is_one_line(tmp_path, bpe_tok, monkeypatch):
    """The up-front check passed, then the model's disk filled while scoring: save_reward_stats says so in one
    line (it was an OSError traceback) and config.json is as it was."""
    import errno
    from eval import report_from_rewards
    tiny_rm(bpe_tok, "linear", "last").save_pretrained(tmp_path / "rm")
    before = (tmp_path / "rm" / "config.json").read_bytes()

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(scoring, "write_json_atomic", full)
    report = report_from_rewards([1.0, 2.0], [0.0, 1.0], [1] * 2, [1] * 2)
    with pytest.raises(UserError, match=r"^cannot write the reward statistics into .*config.json \(No space left on "
                                        r"device\); free space, or drop --save_reward_stats$"):
        scoring.save_reward_stats(tmp_path / "rm", report)
    assert (tmp_path / "rm" / "config.json").read_bytes() == before
