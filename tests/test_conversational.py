"""Conversational data (issue 15) and exports transformers reads as we do.

References: transformers' tokenizer (`apply_chat_template`, plain tokenisation) and transformers'
AutoModelForSequenceClassification / pipeline loading our saved models; learning rates by hand.
The tokenizer is test_chat's byte-level BPE with Qwen3's special tokens and Qwen3's real chat template.
"""
import json
import math
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import eval as eval_cli
import train
from conftest import ROOT, tiny_rm
from support import metrics
from support import report as report_files
from support.errors import UserError
from support.tokenizer import Tokenizer
from rm import RewardModel
from support.export import REWARD_MODEL_TYPE
from test_chat import A1, A2, A2_BAD, CONFIG, QWEN3_TEMPLATE, SYSTEM, U1, U2, hf_ids, make_model_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat-tok"))


@pytest.fixture(scope="module")
def hf_tok(chat_dir):
    return transformers.AutoTokenizer.from_pretrained(str(chat_dir))


def hf_text_ids(hf_tok, text):
    return list(hf_tok(text, add_special_tokens=False)["input_ids"])




# ----------------------------------------------------------------------------------------------
# Conversational rows -> the ids transformers' apply_chat_template gives (what TRL feeds: no eos)

ROWS = {
    "implicit prompt, multi-turn with system": ({"chosen": [SYSTEM, U1, A1, U2, A2], "rejected": [SYSTEM, U1, A1, U2, A2_BAD]},
                                                [SYSTEM, U1, A1, U2]),
    "explicit prompt list": ({"prompt": [SYSTEM, U1], "chosen": [A1], "rejected": [A2_BAD]}, [SYSTEM, U1]),
    "string prompt held by the conversations": ({"prompt": U1["content"], "chosen": [U1, A1], "rejected": [U1, A2_BAD]},
                                                [U1]),
    "assistant reasoning": ({"prompt": [U1], "chosen": [{**A1, "reasoning_content": "Think."}], "rejected": [A2]},
                            [U1]),
}



def test_files_cat_together_keep_each_rows_own_columns(chat_dir, tmp_path):
    """Two jsonl files cat-ed together: plain hh-rlhf rows (chosen/rejected) first, then conversational rows
    with a `prompt` list. Each row is read by its own keys: the later rows keep their user turn (the
    columns of the first row dropped it, and the chosen text began at `<|im_start|>assistant`)."""
    plain = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    conversational = {"prompt": [U1], "chosen": [A1], "rejected": [A2_BAD], "margin": 1.5}
    alone, mixed = tmp_path / "conversational.jsonl", tmp_path / "mixed.jsonl"
    alone.write_text(json.dumps(conversational) + "\n")
    mixed.write_text(json.dumps(plain) + "\n" + json.dumps(conversational) + "\n")
    chat_format = Tokenizer.from_dir(chat_dir).chat_format()
    stats = data.DataStats()
    first, second = data.load_pairs([str(mixed)], stats=stats, chat_format=chat_format)
    expected = data.load_pairs([str(alone)], chat_format=chat_format)[0]
    assert (first.prompt, first.chosen, first.eos) == ("\n\nHuman: Hi\n\nAssistant:", " Hello!", True)
    assert (second.prompt, second.chosen, second.rejected, second.margin) == \
        (expected.prompt, expected.chosen, expected.rejected, 1.5)
    assert U1["content"] in second.prompt and (stats.read, stats.kept) == (2, 2)

@pytest.mark.parametrize("name", list(ROWS))
def test_conversational_rows_tokenise_as_apply_chat_template(name, chat_dir, hf_tok):
    row, prompt = ROWS[name]
    tok = Tokenizer.from_dir(chat_dir)
    pair = data.make_pair(row, "s", tok.chat_format())
    item = data.tokenize_pair(tok, pair, 1000)
    chosen = prompt + (row["chosen"][len(prompt):] if "prompt" not in row or isinstance(row["prompt"], str)
                       else row["chosen"])
    rejected = prompt + (row["rejected"][len(prompt):] if "prompt" not in row or isinstance(row["prompt"], str)
                         else row["rejected"])
    assert item.chosen_ids == hf_ids(hf_tok, chosen)           # no eos appended, as TRL
    assert item.rejected_ids == hf_ids(hf_tok, rejected)
    assert item.chosen_ids[:item.prompt_len] == item.rejected_ids[:item.prompt_len] and item.prompt_len > 0
    # score() sees the same ids for the whole conversation
    assert tok.sequence(chosen) == item.chosen_ids


def test_conversation_without_a_template_is_one_clear_error(chat_dir, tmp_path):
    no_template = make_model_dir(tmp_path / "plain", config={k: v for k, v in CONFIG.items() if k != "chat_template"})
    tok = Tokenizer.from_dir(no_template)
    row = {"chosen": [U1, A1], "rejected": [U1, A2_BAD]}
    with pytest.raises(UserError, match="need a chat template, but the model's tokenizer has no chat template; "
                                        "pass --chat_template PATH"):
        data.make_pair(row, "rows.jsonl", tok.chat_format())
    with pytest.raises(UserError, match="--chat_template is none; use --chat_template auto or PATH"):
        data.make_pair(row, "rows.jsonl", Tokenizer.from_dir(chat_dir).chat_format("none"))
    with pytest.raises(UserError, match="--chat_template .*nope.jinja: no such file; give a .jinja file, auto or none"):
        tok.chat_format(str(tmp_path / "nope.jinja"))
    # a template file given by path renders them, and becomes the tokenizer's (saved with the model)
    path = tmp_path / "qwen3.jinja"
    path.write_text(QWEN3_TEMPLATE)
    assert isinstance(data.make_pair(row, "rows.jsonl", tok.chat_format(str(path))), data.Pair)
    tok.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == QWEN3_TEMPLATE
    assert Tokenizer.from_dir(tmp_path / "saved").chat_template == QWEN3_TEMPLATE


# ----------------------------------------------------------------------------------------------
# Plain text: tokenised whole, as transformers and TRL tokenise it

def test_prompt_and_response_are_tokenised_whole(chat_dir, hf_tok):
    tok = Tokenizer.from_dir(chat_dir)
    pair = data.Pair("What is the capital of France? A:", " Paris.", " The capital of France is Paris.")
    pair_space = data.Pair("What is the capital of France? A: ", "Paris.", "The capital of France is Paris.")
    for p in (pair, pair_space):
        item = data.tokenize_pair(tok, p, 1000)
        assert item.chosen_ids == hf_text_ids(hf_tok, p.prompt + p.chosen + tok.eos_token)
        assert item.rejected_ids == hf_text_ids(hf_tok, p.prompt + p.rejected + tok.eos_token)
        assert tok.sequence(p.prompt + p.chosen) == item.chosen_ids  # what score() feeds
    # the case that made the difference: apart, "A: " + "Paris" gives "Ġ", "Paris"; whole, "ĠParis"
    apart = tok.encode(pair_space.prompt) + tok.encode(pair_space.chosen)
    assert apart != data.tokenize_pair(tok, pair_space, 1000).chosen_ids[:-1]
    # the token that crosses the boundary belongs to the response, and the prompt is cut from the left only
    item = data.tokenize_pair(tok, pair_space, 1000)
    assert hf_tok.convert_ids_to_tokens(item.chosen_ids[item.prompt_len]) == "ĠParis"
    short = data.tokenize_pair(tok, pair_space, item.length - 3)
    assert short.prompt_len == item.prompt_len - 3
    assert short.chosen_ids == item.chosen_ids[3:] and short.rejected_ids == item.rejected_ids[3:]


def test_eos_is_not_doubled(chat_dir):
    tok = Tokenizer.from_dir(chat_dir)
    item = data.tokenize_pair(tok, data.Pair("Q:", " yes<|im_end|>", " no"), 100)
    assert item.chosen_ids[-2:] != [tok.eos_id, tok.eos_id] and item.chosen_ids[-1] == tok.eos_id
    assert item.rejected_ids[-1] == tok.eos_id
    assert tok.sequence("Q: yes<|im_end|>") == item.chosen_ids


# ----------------------------------------------------------------------------------------------
# Exports, read by transformers

def hf_rewards(hf_model, hf_tok, texts):
    out = []
    for text in texts:  # one at a time: no padding question at all
        ids = torch.tensor([hf_text_ids(hf_tok, text)])
        with torch.no_grad():
            out.append(hf_model(input_ids=ids).logits[0, 0].item())
    return out


TEXTS = ["\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
         "\n\nHuman: Hello!\n\nAssistant: How can I help you today?", "Let me think about it step by step."]


@pytest.mark.parametrize("eos_is_pad", [False, True])
def test_linear_export_scores_the_same_in_transformers(eos_is_pad, chat_dir, tmp_path):
    config = {**CONFIG, "eos_token": "<|endoftext|>"} if eos_is_pad else CONFIG
    tok = Tokenizer.from_dir(make_model_dir(tmp_path / "tok", config=config))
    assert (tok.eos_id == tok.pad_id) == eos_is_pad
    model = tiny_rm(tok, "linear", "last")
    model.save_pretrained(tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert (hf.config.pad_token_id, hf.config.eos_token_id, hf.config.bos_token_id) == (tok.pad_id, tok.eos_id, None)
    ours = model.score(TEXTS)
    # the README's recipe: the text plus the eos string, one text per call or padded batches
    want = hf_rewards(hf, hf_tok, [t + hf_tok.eos_token for t in TEXTS])
    assert max(abs(a - b) for a, b in zip(ours, want)) < 1e-4
    batch = hf_tok([t + hf_tok.eos_token for t in TEXTS], padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        padded = hf(**batch).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(ours, padded)) < 1e-4
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none")
    piped = [pipe(t + hf_tok.eos_token)[0]["score"] for t in TEXTS]
    assert max(abs(a - b) for a, b in zip(ours, piped)) < 1e-4
    # conversations: apply_chat_template, nothing appended
    conversation = [U1, A1]
    with torch.no_grad():
        hf_conv = hf(input_ids=torch.tensor([hf_ids(hf_tok, conversation)])).logits[0, 0].item()
    assert abs(model.score([conversation])[0] - hf_conv) < 1e-4
    if eos_is_pad:  # had we appended the eos (= pad), transformers would pool the token before it
        ids = tok.encode(TEXTS[0]) + [tok.eos_id]
        with torch.no_grad():
            appended = model(torch.tensor([ids])).item()
        assert abs(appended - want[0]) > 1e-3


@pytest.mark.parametrize("head,pooling", [("mlp", "mean"), ("mlp", "last"), ("linear", "mean")])
def test_exports_transformers_cannot_read_are_refused_there(head, pooling, chat_dir, tmp_path):
    tok = Tokenizer.from_dir(chat_dir)
    model = tiny_rm(tok, head, pooling)
    model.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["model_type"] == REWARD_MODEL_TYPE and (saved["eos_token_id"], saved["bos_token_id"]) == (tok.eos_id, None)
    with pytest.raises(ValueError, match=REWARD_MODEL_TYPE):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match=REWARD_MODEL_TYPE):
        transformers.pipeline("text-classification", model=str(tmp_path / "rm"))
    # we load it, and a save from before (model_type "qwen3") still loads
    texts = TEXTS + [[U1, A1]]
    assert RewardModel.from_pretrained(tmp_path / "rm").score(texts) == model.score(texts)
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**saved, "model_type": "qwen3"}))
    assert RewardModel.from_pretrained(tmp_path / "rm").score(texts) == model.score(texts)


# ----------------------------------------------------------------------------------------------
# The command line, end to end on conversational jsonl and parquet

def conversational_rows(n):
    answers = [("Paris.", "Paris is sunny."), ("The capital of France is Paris.", "Let me think about it.")]
    rows = []
    for i in range(n):
        good, bad = answers[i % 2]
        rows.append({"prompt": [SYSTEM, U1] if i % 3 else [U1],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}], "margin": float(i % 2)})
    return rows


@pytest.fixture
def conversational_files(tmp_path):
    rows = conversational_rows(12)
    jsonl = tmp_path / "conv.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)  # prompt/chosen/rejected: list<struct<role, content>>
    assert pa.types.is_list(pq.read_schema(parquet).field("chosen").type)
    return jsonl, parquet


def test_cli_trains_and_evaluates_on_conversational_jsonl_and_parquet(conversational_files, chat_dir, tmp_path,
                                                                      hf_tok):
    jsonl, parquet = conversational_files
    model_dir = tmp_path / "base"
    tiny_rm(Tokenizer.from_dir(chat_dir)).save_pretrained(model_dir)
    flags = ["--model", str(model_dir), "--max_steps", "3", "--batch_size", "2", "--max_length", "96",
             "--logging_steps", "1", "--device", "cpu", "--no_progress"]
    for train_file, eval_file in ((jsonl, parquet), (parquet, jsonl)):
        out = tmp_path / f"out-{train_file.suffix[1:]}"
        train.main(flags + ["--dataset", str(train_file), "--eval_dataset", str(eval_file), "--output_dir", str(out)])
        assert (out / "final_model" / "chat_template.jinja").read_text() == QWEN3_TEMPLATE
        report = json.loads((out / "evaluation_report.json").read_text())
        assert report["counts"]["evaluated"] == 12 and report["counts"]["skipped"] == 0
        again = eval_cli.main([str(out), "--no_progress", "--output", str(tmp_path / "again.json")])
        assert again["accuracy"] == report["accuracy"] and again["loss"] == pytest.approx(report["loss"], abs=1e-6)
    # the saved model scores a conversation as training fed it: apply_chat_template's ids, nothing appended
    model = RewardModel.from_pretrained(out / "final_model")
    ids = torch.tensor([hf_ids(hf_tok, [U1, A1])])
    with torch.no_grad():
        assert model.score([[U1, A1]])[0] == pytest.approx(model(ids).item(), abs=1e-6)


def test_cli_refuses_conversations_without_a_template_in_one_line(conversational_files, tmp_path):
    jsonl, _ = conversational_files
    plain = make_model_dir(tmp_path / "plain", config={k: v for k, v in CONFIG.items() if k != "chat_template"})
    model_dir = tmp_path / "base"
    tiny_rm(Tokenizer.from_dir(plain)).save_pretrained(model_dir)
    run = subprocess.run([sys.executable, "train.py", "--model", str(model_dir), "--dataset", str(jsonl),
                          "--eval_split", "none", "--output_dir", str(tmp_path / "out"), "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: {jsonl}: conversations (lists of {{role, content}} messages) need a chat "
                                 "template") and "--chat_template PATH" in run.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Logging conventions, the final evaluation, the table, quiet bitsandbytes

def test_log_records_the_lr_each_step_used(tmp_path, monkeypatch):
    from test_train import tiny_cfg
    calls = []
    real = eval_cli.evaluate
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = train.train(tiny_cfg(tmp_path, max_steps=8, warmup_ratio=0.25, logging_steps=1, eval_steps=1000,
                                  learning_rate=1e-3))
    lrs = [r["lr"] for r in result["history"] if "lr" in r]
    # warmup 2 steps: 1/3, 2/3 of the peak; then cosine over the 6 remaining steps, from the peak
    want = [1e-3 / 3, 2e-3 / 3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs == [metrics.significant(w) for w in want]  # to six significant digits, as the loss
    assert len(calls) == 1  # the last step's held-out report is the final report: scored once


def test_loss_and_lr_are_logged_with_significant_digits():
    assert metrics.significant(1.1634e-5) == 1.1634e-5 and metrics.significant(0.693147180559) == 0.693147
    since_last_log = metrics.MetricsSinceLastLog()
    since_last_log.add(metrics.StepMetrics(loss=1.16e-5, accuracy=1.0, margin=12.5, tokens=10.0))
    record = since_last_log.record(1, 0.1, 0.000980392156862745, torch.tensor(0.5), torch.device("cpu"))
    assert record["loss"] == pytest.approx(1.16e-5, rel=1e-6) and record["margin"] == 12.5
    # the learning rate too (issue 21): 0.000980392, not 0.000980392156862745, in log.jsonl and on the console
    assert record["lr"] == 0.000980392 and repr(record["lr"]) == "0.000980392"
    assert metrics.significant(5e-6) == 5e-6 and metrics.significant(1e-3 / 3) == 0.000333333


def test_eval_table_keeps_the_source_apart_from_the_number():
    report = eval_cli.report_from_rewards([1.0, 2.0], [0.0, 0.0], [3, 4], [3, 4],
                                          ["/data/some/long/directory/hh_test.parquet"] * 2)
    report.update(counts=eval_cli.counts_from_stats(2, None), checkpoint="ckpt", dataset=["d"], split="test",
                  max_length=64)
    line = next(ln for ln in report_files.summary(report).splitlines() if "hh_test.parquet" in ln)
    assert "hh_test.parquet 1.000" in line


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_8bit_optim_on_cpu_prints_no_kernels_notice(hub, tmp_path):
    """bitsandbytes' import on CPU fetched a kernel from the Hub, with notices that depend on the network
    and the cache: each is fixed here (an empty cache; offline, or a Hub that refuses connections)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1" if hub == "offline" else "0",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # port 9 (discard): refused at once, never the real Hub
    env.pop("HF_HUB_CACHE", None)
    code = ("import train; from support import validate; "
            "validate.validate(train.TrainConfig(optim_8bit=True, device='cpu'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "kernels" not in run.stderr + run.stdout, run.stderr


# ----------------------------------------------------------------------------------------------
# tokenizer_config.json: read as every small JSON file is, one line when it is wrong

BAD_TOKENIZER_CONFIGS = {
    "nested 100k deep": ('{"a": ' * 100_000 + "1" + "}" * 100_000, r" is not valid JSON \(nested too deeply\); "),
    "a named template with a non-string name": (
        json.dumps({**CONFIG, "chat_template": [{"name": ["default"], "template": QWEN3_TEMPLATE}]}),
        r": chat_template is a list whose entries are not all \{\"name\": string, \"template\": string\}; "),
    "1 GiB": (None, r" is over 16 MiB, far more than a config ever holds; "),
}


@pytest.mark.parametrize("name", list(BAD_TOKENIZER_CONFIGS))
def test_a_bad_tokenizer_config_is_one_line_everywhere(name, chat_dir, conversational_files, tmp_path):
    text, message = BAD_TOKENIZER_CONFIGS[name]
    model_dir = tmp_path / "base"
    tiny_rm(Tokenizer.from_dir(chat_dir)).save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)  # the template comes from tokenizer_config.json
    config = model_dir / "tokenizer_config.json"
    if text is None:
        with open(config, "r+b") as f:
            f.truncate(1 << 30)  # sparse: nothing is written, and it must not be read either
    else:
        config.write_text(text)
    jsonl, _ = conversational_files
    calls = [lambda: RewardModel.from_pretrained(model_dir),
             lambda: train.main(["--model", str(model_dir), "--dataset", str(jsonl), "--eval_split", "none",
                                 "--output_dir", str(tmp_path / "out"), "--device", "cpu"]),
             lambda: eval_cli.main([str(model_dir), "--dataset", str(jsonl), "--output", str(tmp_path / "r.json")])]
    for call in calls:
        with pytest.raises(UserError, match="^" + re.escape(str(config)) + message) as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()
    if name == "nested 100k deep":  # and on the command line: exit 2, one line
        run = subprocess.run([sys.executable, "eval.py", str(model_dir), "--dataset", str(jsonl)], cwd=ROOT,
                             capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith(f"error: {config} is not valid JSON (nested too deeply)"), run.stderr
