"""Conversations -> text, with the model's own chat template (as transformers' `apply_chat_template` does).

Most preference datasets store `chosen`/`rejected` (and sometimes `prompt`) as lists of
{"role", "content"} messages. TRL renders prompt+chosen and prompt+rejected with the tokenizer's chat
template and appends NO eos, so we do the same, and a test checks that the ids match transformers'.

- A chat template is Jinja code shipped with the model: untrusted. It runs in jinja2's
  ImmutableSandboxedEnvironment (no attribute starting with "_", no list.append, ...), with the same
  helpers transformers gives it (`raise_exception`, a `tojson` that keeps non-ASCII text, `strftime_now`,
  `{% break %}`, `{% generation %}`), so a template renders here exactly as in transformers.
- The sandbox limits what a template may touch, not how much work it does or how much text it makes
  (`{{ 'x' * 3000000000 }}`, nested `range` loops, `lipsum(10**9)`, a macro that builds its text in a
  buffer). So templates run in a separate renderer process (`_Renderer`, started on first use), which
  may allocate RENDER_MEMORY and take RENDER_SECONDS per row, and whose text stops at MAX_RENDER_CHARS;
  past a limit it is stopped (killed if need be) and a fresh one takes the next row. Ctrl-C ends both.
- A template that fails on a conversation (over a limit, or an error such as `{{ 1/0 }}`, a recursive
  macro, `range(10**9)`) skips that row with the reason, counted like every skipped row; one that fails on
  each of the first FAIL_LIMIT conversations is refused in one line. Invalid Jinja and sandbox escapes
  are refused at once. A conversation nested over MAX_NESTING deep is a skipped row, never walked.
- What the template sees is rebuilt from plain JSON types, keys whose value is None are dropped (a
  parquet struct column fills missing fields with None; templates test for absent keys), and a message's
  reasoning is passed under all of the names templates read (`reasoning_content`, `thinking`), as in
  transformers.
- The split into prompt and response text: see `conversation_pair`.
"""
import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from support import hub
from support.errors import UserError
from support.fileio import read_bounded

MAX_FILE_BYTES = 8 << 20  # a chat template is a few KB (tokenizer_config.json: hub.read_json's bound)
ROLES = ("system", "user", "assistant", "tool")
ROOT = Path(__file__).resolve().parent.parent  # the renderer process imports this module from there
RENDER_SECONDS = 5.0          # one rendering: real templates take milliseconds
RENDER_MEMORY = 512 << 20     # what the renderer process may allocate beyond its start (a 16 MiB row, copied)
MAX_RENDER_CHARS = 32 << 20   # the text of one rendering: a 16 MiB row and the template's own text around it
MAX_NESTING = 32              # messages -> message -> tool_calls -> call -> arguments -> ... (a real one: < 10)
FAIL_LIMIT = 3                # a template that fails on each of the first FAIL_LIMIT conversations is refused
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_bounded(path: Path) -> str:
    """A file's text, refusing a file too big to be a template (a wrong path, a corrupt download)."""
    try:
        return read_bounded(path, MAX_FILE_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e}); check the file") from None
    except ValueError as e:
        raise UserError(f"{path}: {e} ({MAX_FILE_BYTES >> 20} MB at most for a chat template); "
                        "check the file") from None


def read_tokenizer_config(model_dir) -> dict:
    """MODEL_DIR/tokenizer_config.json ({} when there is none), read as every small JSON file is
    (hub.read_json: bounded, a JSON object, nesting that Python's parser refuses is one line)."""
    path = Path(model_dir) / "tokenizer_config.json"
    return hub.read_json(path, "the tokenizer's settings") if path.exists() or path.is_symlink() else {}


def load_chat_template(model_dir, override=None, tokenizer_config: dict | None = None) -> str | None:
    """The model's chat template: `override` (a .jinja file, from --chat_template PATH), else
    MODEL_DIR/chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of
    {"name", "template"} of which "default" is used). None when there is none. `tokenizer_config`: that
    file's content when the caller has read it already (support.tokenizer.Tokenizer.from_dir), so it is read once."""
    if override is not None:
        if not Path(override).exists():
            raise UserError(f"--chat_template {override}: no such file; give a .jinja file, auto or none")
        return _read_bounded(Path(override))
    jinja_file, config_file = Path(model_dir) / "chat_template.jinja", Path(model_dir) / "tokenizer_config.json"
    if jinja_file.exists():  # where recent transformers save the template, and look first (a FIFO: refused)
        return _read_bounded(jinja_file)
    if tokenizer_config is None:
        tokenizer_config = read_tokenizer_config(model_dir)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates (e.g. "default", "tool_use", "rag")
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise UserError(f"{config_file}: chat_template is a list whose entries are not all "
                            '{"name": string, "template": string}; re-download it or pass --chat_template PATH')
        template = next((t["template"] for t in template if t["name"] == "default"), None)
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


class TemplateFailed(UserError):
    """The template failed on this conversation: an error (`{{ 1/0 }}`, a recursive macro) or over a limit
    (time, memory, text). `reason`: the short skip reason a data row is counted under."""

    def __init__(self, detail: str, reason: str):
        super().__init__(f"the chat template failed ({detail}); fix it or pass --chat_template PATH")
        self.detail, self.reason = detail, reason


# -----------------------------------------------------------------------------
# The renderer process: the template runs there, under a memory and a time limit

class _Refused(Exception):
    pass


class _OverTime(BaseException):  # not an Exception: nothing in jinja2 may swallow it
    pass


def _raise_exception(message):
    raise _Refused(str(message))


def _over_time(signum, frame):
    raise _OverTime()


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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _render_reply(request: dict) -> dict:
    """In the renderer process: a request's renderings -> {"texts"}, or what went wrong with the first one
    that fails. Text is taken as the template makes it (a generator) and refused past max_chars, so an
    output loop never fills memory; all of the request's renderings share `seconds`."""
    global _template
    _template = request.get("template", _template)  # sent when it changes
    seconds, max_chars, texts = request["seconds"], request["max_chars"], []
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        for variables in request["renders"]:
            pieces, size = [], 0
            for piece in _compile(_template).generate(**variables):
                size += len(piece)
                if size > max_chars:
                    return {"limit": f"over {max_chars:,} characters of text",
                            "reason": "chat template output too long"}
                pieces.append(piece)
            texts.append("".join(pieces))
        return {"texts": texts}
    except _OverTime:
        return {"limit": f"over {seconds:g} s", "reason": "chat template over its time limit"}
    except MemoryError:
        return {"limit": f"over its {_memory >> 20} MiB of memory", "reason": "chat template over its memory limit"}
    except _Refused as e:
        return {"refused": str(e)[:500]}
    except jinja2.TemplateSyntaxError as e:
        return {"syntax": f"line {e.lineno}: {e.message}"}
    except jinja2.exceptions.SecurityError as e:
        return {"unsafe": str(e)[:500]}
    except Exception as e:  # RecursionError, ZeroDivisionError, OverflowError, UndefinedError, ...
        return {"error": type(e).__name__, "message": str(e)[:500]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


_template, _memory = "", 0  # the renderer process's template and memory limit


def _dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


def _loads(line: bytes):
    return json.loads(line.decode("utf-8", "surrogatepass"))


def serve(memory: int):
    """The renderer process's loop: a JSON request per line on stdin, a JSON reply per line on stdout.
    Its address space may grow by `memory` bytes beyond what it holds at the start."""
    import resource  # here: the renderer process only (Linux, macOS)
    global _memory
    _memory = memory
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it quietly, together with the run
    signal.signal(signal.SIGALRM, _over_time)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:  # Linux; where the address space can't be limited (macOS), the time and text limits still hold
        with open("/proc/self/statm") as f:
            limit = int(f.read().split()[0]) * resource.getpagesize() + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError):
        pass
    for line in sys.stdin.buffer:
        try:
            reply = _render_reply(_loads(line))
        except _OverTime:  # the alarm rang just as the rendering ended
            reply = {"limit": "over its time limit", "reason": "chat template over its time limit"}
        sys.stdout.buffer.write(_dumps(reply))
        sys.stdout.buffer.flush()


class _Renderer:
    """The run's side: one renderer process, started on first use, and again after a limit ended it
    (or in a forked child). One that does not answer in time (a long step the alarm can't interrupt) or
    dies (out of memory in a place that can't recover) is killed: the rendering failed."""

    def __init__(self):
        self.proc, self.pid, self.template, self.lock = None, None, None, threading.Lock()

    def ask(self, template: str, renders: list[dict]) -> dict:
        request = {"renders": renders, "seconds": RENDER_SECONDS, "max_chars": MAX_RENDER_CHARS}
        with self.lock:
            if self.proc is None or self.pid != os.getpid():
                code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        f"from support import chat; chat.serve({RENDER_MEMORY})")
                self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                self.pid, self.template = os.getpid(), None
            if template != self.template:
                request["template"] = self.template = template
            try:
                self.proc.stdin.write(_dumps(request))
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], RENDER_SECONDS + 5)
                line = self.proc.stdout.readline() if ready else b""
            except BrokenPipeError:
                line = b""
            except BaseException:  # Ctrl-C while it renders: it may be halfway through a reply
                self.stop()
                raise
            if not line.endswith(b"\n"):
                self.stop()
                return {"limit": "over its time or memory limit",
                        "reason": "chat template over its time or memory limit"}
            return _loads(line)

    def stop(self):
        if self.proc is not None and self.pid == os.getpid():
            self.proc.kill()
            self.proc.wait()
        self.proc = None


_renderer = _Renderer()
atexit.register(_renderer.stop)


def _check_jinja():
    if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
        raise UserError(f"jinja2 {jinja2.__version__} has known sandbox escapes; pip install -U 'jinja2>=3.1.6'")


def too_deep(value) -> bool:
    """Nested over MAX_NESTING lists and dicts deep: never walked recursively (a 600-deep extra field of a
    message was a RecursionError), a row holding one is skipped as unparsable."""
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else None
        if items is not None:
            if depth >= MAX_NESTING:
                return True
            stack.extend((item, depth + 1) for item in items)
    return False


def _plain(value):
    """Only JSON types reach the template: other objects may carry methods the sandbox doesn't know about.
    Checked with too_deep first."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(_plain(k)): _plain(v) for k, v in value.items()}
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
    return _render(template, [(messages, add_generation_prompt)], variables)[0]


def _render(template: str, conversations: list[tuple[list, bool]], variables: dict) -> list[str]:
    """(messages, add_generation_prompt) pairs rendered, in one request to the renderer process and
    within its limits (RENDER_SECONDS for them all, RENDER_MEMORY, MAX_RENDER_CHARS each). Raises
    TemplateRefused (raise_exception), TemplateFailed (an error or a limit, on these conversations), or
    UserError (invalid Jinja, a sandbox escape: the template is unusable whatever the conversation)."""
    _check_jinja()
    if too_deep([c[0] for c in conversations]) or too_deep(variables):
        raise UserError(f"a message or variable for the chat template is nested over {MAX_NESTING} deep; "
                        "flatten it")
    variables = {"tools": None, "documents": None, **{k: _plain(v) for k, v in variables.items()}}
    reply = _renderer.ask(template, [{**variables, "messages": [_prepare(m) for m in messages],
                                      "add_generation_prompt": generation} for messages, generation in conversations])
    if "texts" in reply:
        return reply["texts"]
    if "refused" in reply:
        raise TemplateRefused(f"the chat template refused the conversation: {reply['refused']}")
    if "syntax" in reply:
        raise UserError(f"the chat template is not valid Jinja ({reply['syntax']}); "
                        "fix it or pass --chat_template PATH")
    if "unsafe" in reply:
        raise UserError(f"the chat template tried something unsafe, refused by the sandbox ({reply['unsafe']}); "
                        "don't use this template")
    if "limit" in reply:
        raise TemplateFailed(reply["limit"], reply["reason"])
    raise TemplateFailed(f"{reply['error']}: {reply['message']}", f"chat template error ({reply['error']})")


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
    - A template that fails on the conversation (an error, or over a limit: see render_chat) skips it,
      with the reason (e.g. "chat template error (ZeroDivisionError)", "chat template over its time limit").
    - prompt_text is the longest common prefix of the two renderings AND of the prompt messages rendered
      alone (with the generation prompt "<|im_start|>assistant\\n" when both responses start with an
      assistant message). That is the prompt's whole rendering for well-behaved templates, and can
      never reach into response text: where a template renders a prompt message differently once a
      response follows it, the split falls earlier, and the response text starts with that bit of
      the prompt's rendering. The split only decides what truncation may cut, not the ids.
    """
    try:
        return _pair(prompt, chosen, rejected, template, **variables)
    except TemplateFailed as e:  # an error or a limit on this conversation: the row is skipped
        return e.reason


def _pair(prompt, chosen, rejected, template: str, **variables) -> tuple[str, str, str] | str:
    """conversation_pair, raising TemplateFailed (ChatFormat.pair counts them)."""
    if too_deep([prompt, chosen, rejected]):
        return "nested too deeply"
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
    generation = chosen[0]["role"] == rejected[0]["role"] == "assistant"
    try:
        full_c, full_r, *head = _render(template, [(prompt + chosen, False), (prompt + rejected, False)]
                                        + ([(prompt, generation)] if prompt else []), variables)
    except TemplateRefused:
        return "refused by the chat template"
    if full_c == full_r:
        return "chosen == rejected"  # they differ only in fields the template leaves out
    cut = _common_prefix(*head, full_c, full_r)
    if cut == len(full_c) or cut == len(full_r):
        return "empty response"
    return full_c[:cut], full_c[cut:], full_r[cut:]


NO_TEMPLATE = "conversation without a chat template"  # a skip reason where ChatFormat.count_missing is set


@dataclass
class ChatFormat:
    """How conversations become text: the template and the variables it gets (support.tokenizer.Tokenizer.chat_format).
    template None: a conversation is refused with a UserError that says what to do (`why_none`)."""
    template: str | None
    variables: dict = field(default_factory=dict)
    why_none: str = "no chat template was given"
    rendered: int = 0  # conversations the template did not fail on, and those it failed on
    failed: int = 0
    count_missing: bool = False  # no template: pair() returns the skip reason NO_TEMPLATE (tools.inspect_data counts)

    def _template(self, where: str) -> str:
        if self.template is None:
            raise UserError(f"{where}: conversations (lists of {{role, content}} messages) need a chat template, "
                            f"but {self.why_none}")
        return self.template

    def pair(self, prompt, chosen, rejected, where: str = "data") -> tuple[str, str, str] | str:
        """conversation_pair with this template: (prompt_text, chosen_text, rejected_text) or a skip reason.
        A template that fails on each of the first FAIL_LIMIT conversations is refused (UserError), so a
        broken one is one line, not a run that skips every row at a time limit each."""
        if self.template is None and self.count_missing:
            return NO_TEMPLATE
        template = self._template(where)
        try:
            out = _pair(prompt, chosen, rejected, template, **self.variables)
        except TemplateFailed as e:
            self.failed += 1
            if self.rendered == 0 and self.failed >= FAIL_LIMIT:
                raise UserError(f"{where}: the chat template failed on each of the first {FAIL_LIMIT} "
                                f"conversations ({e.detail}); fix it or pass --chat_template PATH") from None
            return e.reason
        self.rendered += 1
        return out

    def render(self, messages, where: str = "score") -> str:
        if (reason := _problem(messages)) is not None:
            raise UserError(f"{where}: {reason}; give a text or a list of {{role, content}} messages")
        if too_deep(messages):
            raise UserError(f"{where}: a message is nested over {MAX_NESTING} deep; flatten it")
        return render_chat(self._template(where), list(messages), **self.variables)
