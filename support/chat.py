"""Conversations -> text, with the model's own chat template (as transformers' `apply_chat_template` does).

Most preference datasets store `chosen`/`rejected` (and sometimes `prompt`) as lists of
{"role", "content"} messages. TRL renders prompt+chosen and prompt+rejected with the tokenizer's chat
template and appends NO eos, so we do the same, and a test checks that the ids match transformers'.

- A chat template is Jinja code shipped with the model: untrusted. It runs in jinja2's
  ImmutableSandboxedEnvironment (no attribute starting with "_", no list.append, ...), with the same
  helpers transformers gives it (`raise_exception`, a `tojson` that keeps non-ASCII text, `strftime_now`,
  `{% break %}`, `{% generation %}`), so a template renders here exactly as in transformers.
- What the template sees is rebuilt from plain JSON types, keys whose value is None are dropped (a
  parquet struct column fills missing fields with None; templates test for absent keys), and a message's
  reasoning is passed under all of the names templates read (`reasoning_content`, `thinking`), as in
  transformers.
- The split into prompt and response text: see `conversation_pair`.
"""
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from support.errors import UserError
from support.fileio import read_bounded

MAX_FILE_BYTES = 8 << 20  # a chat template is a few KB, a tokenizer_config.json rarely over 1 MB
ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_bounded(path: Path) -> str:
    """A file's text, refusing a file too big to be a template (a wrong path, a corrupt download)."""
    try:
        return read_bounded(path, MAX_FILE_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); check the file") from None
    except ValueError as e:
        raise UserError(f"{path}: {e} ({MAX_FILE_BYTES >> 20} MB at most for a chat template or "
                        "tokenizer_config.json); check the file") from None


def load_chat_template(model_dir, override=None, tokenizer_config: dict | None = None) -> str | None:
    """The model's chat template: `override` (a .jinja file, from --chat_template PATH), else
    MODEL_DIR/chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of
    {"name", "template"} of which "default" is used). None when there is none. `tokenizer_config`: that
    file's content when the caller has read it already (support.tokenizer.Tokenizer.from_dir), so it is read once."""
    if override is not None:
        if not Path(override).is_file():
            raise UserError(f"--chat_template {override}: no such file; give a .jinja file, auto or none")
        return _read_bounded(Path(override))
    jinja_file, config_file = Path(model_dir) / "chat_template.jinja", Path(model_dir) / "tokenizer_config.json"
    if jinja_file.is_file():  # where recent transformers save the template, and look first
        return _read_bounded(jinja_file)
    if tokenizer_config is None:
        if not config_file.is_file():
            return None
        try:
            tokenizer_config = json.loads(_read_bounded(config_file))
        except ValueError as e:
            raise UserError(f"{config_file}: not a JSON object ({e}); re-download it") from None
    if not isinstance(tokenizer_config, dict):
        raise UserError(f"{config_file}: not a JSON object; re-download it")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates (e.g. "default", "tool_use", "rag")
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def special_token_variables(tokenizer_config: dict) -> dict:
    """bos_token, eos_token, ... as strings, the variables transformers passes to every template."""
    out = {}
    for key in SPECIAL_TOKENS:
        value = tokenizer_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value  # {"content": ...} in older configs
        if isinstance(value, str):
            out[key] = value
    return out


class TemplateRefused(UserError):
    """The template called raise_exception: it refuses this conversation (e.g. roles that don't alternate)."""


def _raise_exception(message):
    raise TemplateRefused(f"the chat template refused the conversation: {message}")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' training masks.
    We only need the text, so it renders its body unchanged (in its own scope, as in transformers)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """jinja's own tojson escapes <, >, & for HTML, which would change the text the model sees."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
        raise UserError(f"jinja2 {jinja2.__version__} has known sandbox escapes; pip install -U 'jinja2>=3.1.6'")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _plain(value):
    """Only JSON types reach the template: other objects may carry methods the sandbox doesn't know about."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (bool, int, float, str):  # subclasses (numpy scalars, enums) back to the base type
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _prepare(message: dict) -> dict:
    message = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(template: str, messages: list, add_generation_prompt: bool = False, **variables) -> str:
    """`messages` rendered with the chat template, as `apply_chat_template(..., tokenize=False)` does.
    `variables`: the special tokens (special_token_variables), enable_thinking, tools, ..."""
    variables = {"tools": None, "documents": None, **{k: _plain(v) for k, v in variables.items()}}
    try:
        return _compile(template).render(messages=[_prepare(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **variables)
    except UserError:
        raise
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                        "fix it or pass --chat_template PATH") from None
    except jinja2.exceptions.SecurityError as e:
        raise UserError(f"the chat template tried something unsafe, refused by the sandbox ({e}); "
                        "don't use this template") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise UserError(f"the chat template failed ({type(e).__name__}: {e}); fix it or pass "
                        "--chat_template PATH") from None


def is_conversation(value) -> bool:
    """A non-empty list of {"role": str, "content": str, ...} messages."""
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value))


def _problem(value) -> str | None:
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return "empty conversation"
    if not is_conversation(value):
        return "not a conversation (messages need a string role and content)"
    if any(m["role"] not in ROLES for m in value):
        return f"unknown role (not {'/'.join(ROLES)})"
    return None


def _common_prefix(*texts: str) -> int:
    n = min(len(t) for t in texts)
    return next((i for i in range(n) if any(t[i] != texts[0][i] for t in texts)), n)


def conversation_pair(prompt, chosen, rejected, template: str, **variables) -> tuple[str, str, str] | str:
    """(prompt_text, chosen_text, rejected_text), or the reason to skip the row.

    - With no prompt (None or []), the prompt is the messages that chosen and rejected share (each keeps
      at least one message of its own). A string prompt next to conversations that already start with
      it as a non-assistant message (HuggingFaceH4/ultrafeedback_binarized) is dropped; otherwise it is
      one user message.
    - prompt+chosen and prompt+rejected are rendered whole, as TRL does (no eos appended), and
      prompt_text + chosen_text and prompt_text + rejected_text are exactly those renderings.
    - prompt_text is the longest common prefix of the two renderings AND of the prompt messages rendered
      alone (with the generation prompt "<|im_start|>assistant\\n" when both responses start with an
      assistant message). That is the prompt's whole rendering for well-behaved templates, and can
      never reach into response text: where a template renders a prompt message differently once a
      response follows it, the split falls earlier, and the response text starts with that bit of
      the prompt's rendering. The split only decides what truncation may cut, not the ids.
    """
    if isinstance(prompt, str):
        holds_prompt = is_conversation(chosen) and is_conversation(rejected) and \
            chosen[0].get("role") != "assistant" and rejected[0].get("role") != "assistant"
        prompt = None if holds_prompt or not prompt.strip() else [{"role": "user", "content": prompt}]
    for value in ([prompt] if prompt else []) + [chosen, rejected]:
        if (reason := _problem(value)) is not None:
            return reason
    prompt, chosen, rejected = list(prompt or []), list(chosen), list(rejected)
    if not prompt:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if chosen == rejected:
        return "chosen == rejected"
    try:
        full_c = render_chat(template, prompt + chosen, **variables)
        full_r = render_chat(template, prompt + rejected, **variables)
        generation = chosen[0]["role"] == rejected[0]["role"] == "assistant"
        head = render_chat(template, prompt, add_generation_prompt=generation, **variables) if prompt else ""
    except TemplateRefused:
        return "refused by the chat template"
    if full_c == full_r:
        return "chosen == rejected"  # they differ only in fields the template leaves out
    cut = _common_prefix(head, full_c, full_r)
    if cut == len(full_c) or cut == len(full_r):
        return "empty response"
    return full_c[:cut], full_c[cut:], full_r[cut:]


@dataclass
class ChatFormat:
    """How conversations become text: the template and the variables it gets (support.tokenizer.Tokenizer.chat_format).
    template None: a conversation is refused with a UserError that says what to do (`why_none`)."""
    template: str | None
    variables: dict = field(default_factory=dict)
    why_none: str = "no chat template was given"

    def _template(self, where: str) -> str:
        if self.template is None:
            raise UserError(f"{where}: conversations (lists of {{role, content}} messages) need a chat template, "
                            f"but {self.why_none}")
        return self.template

    def pair(self, prompt, chosen, rejected, where: str = "data") -> tuple[str, str, str] | str:
        """conversation_pair with this template: (prompt_text, chosen_text, rejected_text) or a skip reason."""
        return conversation_pair(prompt, chosen, rejected, self._template(where), **self.variables)

    def render(self, messages, where: str = "score") -> str:
        if (reason := _problem(messages)) is not None:
            raise UserError(f"{where}: {reason}; give a text or a list of {{role, content}} messages")
        return render_chat(self._template(where), list(messages), **self.variables)
