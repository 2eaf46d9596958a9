"""support/chat.py against transformers' apply_chat_template, with Qwen3's real chat template.

The tokenizer is a small byte-level BPE trained here with Qwen3's special tokens, saved as a model
directory that transformers loads; the template is the one in Qwen/Qwen3-0.6B's tokenizer_config.json.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data
from conftest import ROOT
from support import chat
from support.errors import UserError

# Qwen/Qwen3-0.6B's chat template (thinking mode: <think> blocks after the last user query,
# enable_thinking=False adds an empty one to the generation prompt; tool calls and responses).
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
          "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": QWEN3_TEMPLATE}

SENTENCES = ["The capital of France is Paris.", "What is the capital of France?",
             "Let me think about it step by step.", "Hello! How can I help you today?",
             "You are a helpful assistant.", "Sure, the weather in Zürich is sunny, 21 degrees.",
             "get_weather city arguments name function tool_call tool_response"]


def make_model_dir(path, config=CONFIG):
    """A byte-level BPE tokenizer with Qwen3's special tokens, saved where transformers can load it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(SENTENCES, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qwen3-chat"))


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def hf_ids(hf_tok, messages, **kwargs):
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5: a BatchEncoding


def our_ids(model_dir, text):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "The capital of France is Paris."}
U2 = {"role": "user", "content": "Hello! How can I help you today?"}
A2 = {"role": "assistant", "content": "Let me think about it."}
A2_BAD = {"role": "assistant", "content": "Paris is sunny."}
TOOL_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]}
TOOL = {"role": "tool", "content": "{\"weather\": \"sunny, 21 degrees\"}"}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

CASES = {
    "multi-turn": ([U1, A1, U2, A2], {}),
    "system": ([SYSTEM, U1, A1], {}),
    "assistant-last with reasoning_content": ([U1, A1, U2, {**A2, "reasoning_content": "Think step by step."}], {}),
    "think tags in content, earlier turn dropped": (
        [U1, {**A1, "content": "<think>\nabout it\n</think>\n\nParis."}, U2,
         {**A2, "content": "<think>\nstep by step\n</think>\n\nSure."}], {}),
    "prompt only, generation prompt": ([SYSTEM, U1, A1, U2], {"add_generation_prompt": True}),
    "enable_thinking=False": ([U1], {"add_generation_prompt": True, "enable_thinking": False}),
    "tool calls": ([SYSTEM, U1, TOOL_CALL, TOOL, A1], {"tools": [WEATHER_TOOL]}),
    "None-valued fields are dropped": ([U1, {**A1, "tool_calls": None, "reasoning_content": None}], {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_render_matches_transformers(name, model_dir, hf_tok):
    messages, kwargs = CASES[name]
    text = chat.render_chat(chat.load_chat_template(model_dir), messages, **kwargs)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert our_ids(model_dir, text) == hf_ids(hf_tok, messages, **kwargs)


def test_render_leaves_the_messages_alone():
    messages = [U1, {**A1, "thinking": "hmm", "tool_calls": None}]
    before = json.dumps(messages)
    assert "<think>\nhmm\n</think>" in chat.render_chat(QWEN3_TEMPLATE, messages)  # `thinking` read as reasoning
    assert json.dumps(messages) == before


def test_special_tokens_and_generation_tag_as_in_transformers(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content | tojson }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
                "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}")
    config = {**CONFIG, "bos_token": "<|endoftext|>", "chat_template": template}
    d = make_model_dir(tmp_path / "m", config)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    messages = [U1, {"role": "assistant", "content": "<b>Zürich</b> & co"}]
    ours = chat.render_chat(chat.load_chat_template(d), messages, **chat.special_token_variables(config))
    assert ours == hf.apply_chat_template(messages, tokenize=False)
    assert ours.startswith("<|endoftext|>") and '"<b>Zürich</b> & co"<|im_end|>' in ours


# -----------------------------------------------------------------------------
# Finding the template

def test_load_chat_template_sources(tmp_path):
    d = make_model_dir(tmp_path / "m")
    assert chat.load_chat_template(d) == QWEN3_TEMPLATE
    (d / "chat_template.jinja").write_text("{{ messages[0].content }}")  # wins over tokenizer_config.json
    assert chat.load_chat_template(d) == "{{ messages[0].content }}"
    override = tmp_path / "mine.jinja"
    override.write_text("mine")
    assert chat.load_chat_template(d, override=str(override)) == "mine"
    with pytest.raises(UserError, match="no such file"):
        chat.load_chat_template(d, override=str(tmp_path / "missing.jinja"))

    named = make_model_dir(tmp_path / "named", {**CONFIG, "chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]})
    assert chat.load_chat_template(named) == "default"
    bare = make_model_dir(tmp_path / "bare", {k: v for k, v in CONFIG.items() if k != "chat_template"})
    assert chat.load_chat_template(bare) is None
    assert chat.load_chat_template(tmp_path / "nothing-here") is None


def test_load_chat_template_refuses_bad_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer_config.json is not valid JSON \(Expecting property name"):
        chat.load_chat_template(d)
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(UserError, match="not UTF-8"):
        chat.load_chat_template(d)
    with open(d / "chat_template.jinja", "wb") as f:
        f.truncate(chat.MAX_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(UserError, match="bytes, over the") as e:
        chat.load_chat_template(d)
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# Templates that fail, refuse or try to escape the sandbox

def test_raise_exception_is_a_user_error():
    template = ("{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user') }}"
                "{% endif %}ok")
    assert chat.render_chat(template, [U1]) == "ok"
    with pytest.raises(UserError, match="refused the conversation: Conversations must start with a user") as e:
        chat.render_chat(template, [A1])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ messages.append(messages[0]) }}",  # the immutable sandbox: no mutating methods
    "{{ namespace.__init__.__globals__ }}",
])
def test_sandbox_escapes_are_refused(template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="unsafe") as e:
        chat.render_chat(template, [U1])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("template,match", [("{% for m in messages %}", "not valid Jinja"),
                                            ("{{ messages[0].nope.deeper }}", "template failed"),
                                            ("{{ 'a' + messages[0].role.count }}", "template failed")])
def test_broken_templates_are_user_errors(template, match):
    with pytest.raises(UserError, match=match) as e:
        chat.render_chat(template, [U1])
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# Conversations -> (prompt_text, chosen_text, rejected_text)

def test_is_conversation():
    assert chat.is_conversation([U1, A1]) and chat.is_conversation((U1,))
    for value in ([], "text", None, [U1, "text"], [{"role": "user"}], [{"role": "user", "content": None}],
                  [{"role": 1, "content": "x"}], {"role": "user", "content": "x"}):
        assert not chat.is_conversation(value)


def test_explicit_prompt_joins_to_the_full_rendering(model_dir, hf_tok):
    prompt = [SYSTEM, U1]
    prompt_text, chosen_text, rejected_text = chat.conversation_pair(prompt, [A1], [A2_BAD], QWEN3_TEMPLATE)
    for response, text in (([A1], chosen_text), ([A2_BAD], rejected_text)):
        full = hf_tok.apply_chat_template(prompt + response, tokenize=False)  # what TRL feeds: no eos appended
        assert prompt_text + text == full
        assert our_ids(model_dir, prompt_text + text) == hf_ids(hf_tok, prompt + response)
    assert prompt_text == hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert chosen_text == "<think>\n\n</think>\n\nThe capital of France is Paris.<|im_end|>\n"


def test_implicit_prompt_of_a_multi_turn_pair(model_dir, hf_tok):
    chosen, rejected = [SYSTEM, U1, A1, U2, A2], [SYSTEM, U1, A1, U2, A2_BAD]
    prompt_text, chosen_text, rejected_text = chat.conversation_pair(None, chosen, rejected, QWEN3_TEMPLATE)
    assert prompt_text == hf_tok.apply_chat_template(chosen[:4], tokenize=False, add_generation_prompt=True)
    assert prompt_text + chosen_text == hf_tok.apply_chat_template(chosen, tokenize=False)
    assert prompt_text + rejected_text == hf_tok.apply_chat_template(rejected, tokenize=False)
    assert rejected_text == "<think>\n\n</think>\n\nParis is sunny.<|im_end|>\n"
    assert chat.conversation_pair([], chosen, rejected, QWEN3_TEMPLATE) == (prompt_text, chosen_text, rejected_text)


def test_variables_reach_the_template():
    # enable_thinking=False: the empty think block belongs to the generation prompt, so to the prompt text
    prompt_text, chosen_text, _ = chat.conversation_pair([U1], [A1], [A2_BAD], QWEN3_TEMPLATE, enable_thinking=False)
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chosen_text == "The capital of France is Paris.<|im_end|>\n"
    # ... unless a response has reasoning: the split falls where the renderings part, inside the think block
    chosen = [{**A1, "reasoning_content": "Hmm."}]
    prompt_text, chosen_text, _ = chat.conversation_pair([U1], chosen, [A2_BAD], QWEN3_TEMPLATE, enable_thinking=False)
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n") and chosen_text.startswith("Hmm.\n</think>")
    assert prompt_text + chosen_text == chat.render_chat(QWEN3_TEMPLATE, [U1] + chosen)


def test_string_prompt_with_conversations():
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt, and chosen/rejected that hold it as a user turn
    pair = chat.conversation_pair(U1["content"], [U1, A1], [U1, A2_BAD], QWEN3_TEMPLATE)
    assert pair == chat.conversation_pair(None, [U1, A1], [U1, A2_BAD], QWEN3_TEMPLATE)
    # responses only: the string is the user turn
    assert chat.conversation_pair(U1["content"], [A1], [A2_BAD], QWEN3_TEMPLATE) == pair


def test_a_template_that_renders_the_prompt_differently_splits_earlier():
    # the last message before the response is rendered in full only when it is last: the split backs off
    template = ("{% for m in messages %}[{{ m.role }}]"
                "{{ m.content if loop.last or m.role != 'user' else m.content[:3] }}{% endfor %}")
    prompt_text, chosen_text, rejected_text = chat.conversation_pair([U1], [A1], [A2_BAD], template)
    assert prompt_text == "[user]Wha"
    assert prompt_text + chosen_text == chat.render_chat(template, [U1, A1])
    assert prompt_text + rejected_text == chat.render_chat(template, [U1, A2_BAD])


@pytest.mark.parametrize("prompt,chosen,rejected,reason", [
    (None, [U1, A1], [U1, A1], "chosen == rejected"),
    (None, [U1, A1], [U1, {**A1, "unread": "x"}], "chosen == rejected"),  # the template never shows it
    (None, [], [U1, A1], "empty conversation"),
    (None, [U1, "text"], [U1, A1], "not a conversation"),
    (None, "text", [U1, A1], "not a conversation"),
    ([{"role": "user", "content": None}], [A1], [A2_BAD], "not a conversation"),
    (None, [{"role": "human", "content": "hi"}, A1], [{"role": "human", "content": "hi"}, A2], "unknown role"),
])
def test_bad_conversations_give_a_reason(prompt, chosen, rejected, reason):
    out = chat.conversation_pair(prompt, chosen, rejected, QWEN3_TEMPLATE)
    assert isinstance(out, str) and out.startswith(reason)


def test_a_refusing_template_skips_the_row():
    template = "{% if messages[-1].content == 'bad' %}{{ raise_exception('no') }}{% endif %}{{ messages | length }}"
    assert chat.conversation_pair([U1], [A1], [{"role": "assistant", "content": "bad"}], template) \
        == "refused by the chat template"



# -----------------------------------------------------------------------------
# Templates that never finish or fill memory, and templates that fail on a conversation

# Each renders until memory runs out (a MemoryError traceback) or hangs in a sandbox that limits only
# what a template may touch: the renderer process's limits stop them (here with a 1 s time limit).
BOMBS = {
    "a 3 GB string": ("{{ 'x' * 3000000000 }}", "chat template over its memory limit"),
    "a 1 GB format width": ("{{ '%999999999d'|format(1) }}", "chat template over its memory limit"),
    "an output loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0].content * 100 }}"
                       "{% endfor %}{% endfor %}", "chat template output too long"),
    "lipsum(10**9)": ("{{ lipsum(10**9) }}", "chat template over its"),  # time or memory, whichever first
    "nested range loops, no output": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                      "{% endfor %}", "chat template over its time limit"),
    "a loop over a 1 MB string in a loop": ("{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}"
                                            "{% endfor %}", "chat template over its time limit"),
}
ERRORS = {
    "range(10**9)": ("{% for i in range(10**9) %}{% endfor %}", "OverflowError"),  # the sandbox's own refusal
    "a recursive macro": ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "RecursionError"),
    "1/0": ("{{ 1/0 }}", "ZeroDivisionError"),
    "replace(count=10**30)": ("{{ 'ab'|replace('a', 'b', 10**30) }}", "OverflowError"),
    "a missing field": ("{{ messages[0].nope.deeper }}", "UndefinedError"),
}


@pytest.fixture
def fast_limits(monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 1.0)
    monkeypatch.setattr(chat, "MAX_RENDER_CHARS", 1 << 20)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_template_that_never_ends_or_fills_memory_skips_the_row(name, fast_limits):
    template, reason = BOMBS[name]
    before, start = peak_rss_mib(), time.monotonic()
    assert chat.conversation_pair([U1], [A1], [A2_BAD], template).startswith(reason)
    with pytest.raises(UserError, match=r"^the chat template failed \(over .*\); fix it or pass --chat_template PATH$"):
        chat.render_chat(template, [U1])  # score(): one line
    assert time.monotonic() - start < 2 * (1.0 + 5) and peak_rss_mib() - before < 100
    assert chat.render_chat("{{ messages[0].content }}", [U1]) == U1["content"]  # and the next one renders


@pytest.mark.parametrize("name", list(ERRORS))
def test_a_template_error_skips_the_row_with_its_reason(name):
    template, error = ERRORS[name]
    assert chat.conversation_pair([U1], [A1], [A2_BAD], template) == f"chat template error ({error})"
    with pytest.raises(UserError, match=rf"^the chat template failed \({error}: .*\); fix it or pass "
                                        r"--chat_template PATH$") as e:
        chat.render_chat(template, [U1])
    assert "\n" not in str(e.value)


def test_a_template_that_fails_on_every_row_is_refused_in_one_line(fast_limits):
    fails = chat.ChatFormat("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    for _ in range(chat.FAIL_LIMIT - 1):
        assert fails.pair([U1], [A1], [A2_BAD], "f.jsonl") == "chat template over its time limit"
    with pytest.raises(UserError) as e:
        fails.pair([U1], [A1], [A2_BAD], "f.jsonl")
    assert str(e.value) == (f"f.jsonl: the chat template failed on each of the first {chat.FAIL_LIMIT} conversations "
                            "(over 1 s); fix it or pass --chat_template PATH")
    # a template that fails on some rows only: those are skipped, however many, and the rest render
    some = chat.ChatFormat("{% if messages[-1].content == 'bad' %}{{ 1/0 }}{% endif %}"
                           "{% for m in messages %}{{ m.content }}|{% endfor %}")
    bad = [{"role": "assistant", "content": "bad"}]
    expected = (U1["content"] + "|", A1["content"] + "|", A2_BAD["content"] + "|")
    assert some.pair([U1], [A1], [A2_BAD]) == expected
    for _ in range(2 * chat.FAIL_LIMIT):
        assert some.pair([U1], bad, [A2_BAD]) == "chat template error (ZeroDivisionError)"
    assert some.pair([U1], [A1], [A2_BAD]) == expected


def test_template_failures_are_counted_when_reading_data(tmp_path):
    rows = [{"prompt": [U1], "chosen": [{"role": "assistant", "content": c}], "rejected": [A2_BAD]}
            for c in ("bad", "fine", "bad", "good")]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = ("{% if messages[-1].content == 'bad' %}{{ 1/0 }}{% endif %}"
                "{% for m in messages %}{{ m.content }}|{% endfor %}")
    stats = data.DataStats()
    pairs = data.load_pairs(str(path), stats=stats, chat_format=chat.ChatFormat(template))
    assert [p.chosen for p in pairs] == ["fine|", "good|"]
    assert stats.skipped == {"chat template error (ZeroDivisionError)": 2} and stats.read == 4


def run_data_cli(path, template_file, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tools.inspect_data", str(path), "--chat_template", str(template_file)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_cli_refuses_a_template_that_fails_on_every_row_in_one_line(tmp_path):
    rows = [{"prompt": [U1], "chosen": [A1], "rejected": [A2_BAD]}] * 10
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bomb.jinja").write_text(BOMBS["a 3 GB string"][0])
    run = run_data_cli(path, tmp_path / "bomb.jinja")
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2 and err == (f"error: {path}: the chat template failed on each of the first "
                                           f"{chat.FAIL_LIMIT} conversations (over its {chat.RENDER_MEMORY >> 20} "
                                           "MiB of memory); fix it or pass --chat_template PATH\n"), err


def test_ctrl_c_stops_a_rendering_at_once_and_leaves_no_process(tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps({"prompt": [U1], "chosen": [A1], "rejected": [A2_BAD]}) + "\n")
    (tmp_path / "hang.jinja").write_text(BOMBS["nested range loops, no output"][0])
    run = run_data_cli(path, tmp_path / "hang.jinja", start_new_session=True)
    deadline = time.monotonic() + 120
    while len(session_pids(run.pid)) < 2 and time.monotonic() < deadline:  # until the renderer process runs
        time.sleep(0.1)
    time.sleep(0.5)
    start = time.monotonic()
    os.kill(run.pid, signal.SIGINT)  # the run alone: the renderer process must be ended by the run
    out, err = run.communicate(timeout=30)
    assert run.returncode == 130 and err == "interrupted (Ctrl-C)\n" and time.monotonic() - start < chat.RENDER_SECONDS
    assert session_pids(run.pid) == []  # the renderer process is gone too


def session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # session id; a zombie has ended
            pids.append(int(stat.parent.name))
    return pids


def test_a_message_nested_600_deep_is_an_unparsable_row(tmp_path):
    deep = "x"
    for _ in range(600):
        deep = [deep]
    rows = [{"chosen": [U1, {**A1, "extra": deep}], "rejected": [U1, A2_BAD]},
            {"chosen": [U1, A1], "rejected": [U1, A2_BAD]}]
    path = tmp_path / "deep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(json.dumps(rows[0])) < 2500
    stats = data.DataStats()
    assert len(data.load_pairs(str(path), stats=stats, chat_format=chat.ChatFormat(QWEN3_TEMPLATE))) == 1
    assert stats.skipped == {"nested too deeply": 1}
    with pytest.raises(UserError, match=r"^score: a message is nested over 32 deep; flatten it$"):
        chat.ChatFormat(QWEN3_TEMPLATE).render(rows[0]["chosen"])
