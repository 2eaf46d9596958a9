"""A reward server for RL: OpenRLHF's remote reward-model protocol over HTTP, standard library only.

    python -m tools.serve out/demo/final_model                      # http://127.0.0.1:5000/get_reward
    python -m tools.serve out/rm/final_model --device cuda --bf16 --batch_size 64
    curl -s 127.0.0.1:5000/get_reward -d '{"query": ["\\n\\nHuman: hi\\n\\nAssistant: hello"]}'
    # OpenRLHF:  --reward.remote_url http://127.0.0.1:5000/get_reward

- POST /get_reward takes OpenRLHF's body {"query": [...], "prompts": [...], "labels": [...]} (only "query"
  is read: full texts, prompt and response together, or conversations, lists of {role, content} messages)
  and answers {"rewards": [...], "scores": [...]}, the same numbers twice in query order, as
  openrlhf.cli.serve_rm answers and its client reads. GET /health says whether it is up.
- A text is scored by RewardModel.score, exactly as eval.py and training see it: the same ids, the eos
  appended to a text (a conversation rendered with the model's chat template gets nothing), and a text
  longer than --max_length tokens keeps its END (the response); --normalize answers score(normalize=True),
  (r - mean) / std with the saved statistics. CHECKPOINT is anything eval.py accepts, any head.
- Batching: handler threads (ThreadingHTTPServer) read and check each request; ONE scoring thread
  (Batcher) runs the model. It takes every request waiting, and while more are being read it waits for
  them up to --max_wait_ms, until it holds --batch_size texts: clients that ask together are scored in
  the same forward passes. A lone client is never kept waiting for company.
  A request is scored in pieces of at most --batch_size texts, and before each piece the scoring thread
  drops the requests whose client has gone: a client that left never keeps the others waiting.
- It never falls over: every refusal is a JSON {"error": "..."} with its status code (docs/serving.md
  lists them and the limits); a failure inside the model answers 500 only to the requests whose texts fail.
  What a client can hold is bounded: connections (--max_connections), the time to send a request
  (--request_timeout, from its first byte), the bytes of its head, the body's bytes and JSON values, and
  the bodies held at once (BODY_BUDGET bodies of --max_body_mb).
  SIGTERM or Ctrl-C stops accepting, answers the requests in flight and exits 0 (a second one: at once, 130).
- No authentication: bind to loopback (the default) or put it behind something that checks clients.
"""
import collections
import io
import ipaddress
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from support.cli import positive_int
from support import chat, tokenizer
from support.errors import ArgumentParser, UserError, run_cli

ROUTES = {"/get_reward": "POST", "/health": "GET"}   # path -> the one method it takes
DEFAULT_MAX_BODY_MB = 32         # a body over this is refused (413) from its Content-Length, unread
DEFAULT_MAX_TEXTS = 1024         # texts per request
JSON_VALUES_PER_TEXT = 64        # a body's JSON may hold this many values (commas) per --max_texts: what a
                                 # conversation of ~30 messages needs, and bounded before parsing
DEFAULT_MAX_CONNECTIONS = 128    # connections at once; more are answered 503 at once
DEFAULT_REQUEST_TIMEOUT_S = 60   # a request (line, headers, body) must arrive whole this long after its first byte
MAX_HEAD_BYTES = 64 * 1024       # request line and headers together
MAX_LINE = 65536                 # http.server's own limit on the request line (414 above it)
BODY_BUDGET = 4                  # request bodies held at once, in --max_body_mb: more wait outside (503)
ANSWER_TIMEOUT_S = 600           # a request waits this long for its scores at most (then 503)
IDLE_TIMEOUT_S = 30              # a connection silent this long (idle keep-alive, a stalled body) is closed
DISCARD_MAX = 1 << 20           # a refused request's unread body up to this size is read before answering
GRACE_S = 10                     # on SIGTERM/Ctrl-C, how long the requests in flight have to finish
STOP_S = 5                       # then how long the piece being scored has to finish (else exit under it)


class Refusal(Exception):
    """A request we do not serve: answered with `status` and {"error": message}, then the connection closes."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class Disconnected(Exception):
    """The client went away before its request was read whole, or before it was scored: nothing to answer."""


class HeadTooLarge(Exception):
    """The request line and headers are over MAX_HEAD_BYTES."""


# ----------------------------------------------------------------------------------------------
# The scoring thread


@dataclass(eq=False)  # a Job is itself (found in the queue by identity)
class Job:
    """One request's texts, scored in pieces of at most batch_size, shortest first (so that a piece pads little,
    as score() sorts a whole call); gone() says whether its client has left."""
    texts: list
    gone: object = lambda: False
    future: Future = field(default_factory=Future)
    rewards: list = field(default_factory=list)   # of the texts scored so far, in `order`

    def __post_init__(self):
        size = [len(t) if isinstance(t, str) else sum(len(str(m.get("content"))) for m in t) for t in self.texts]
        self.order = sorted(range(len(self.texts)), key=size.__getitem__)

    def piece(self, start: int, end: int) -> list:
        return [self.texts[i] for i in self.order[start:end]]

    def in_request_order(self) -> list:
        rewards = [0.0] * len(self.texts)
        for i, reward in zip(self.order, self.rewards):
            rewards[i] = reward
        return rewards

    def answer(self, result=None, error: Exception | None = None):
        """Set the Future once: a request dropped (stop, client gone) meanwhile keeps its first outcome."""
        try:
            self.future.set_exception(error) if error else self.future.set_result(result)
        except InvalidStateError:
            pass


class Batcher:
    """The one thread that runs the model. Handler threads submit() a request's texts and wait on the
    Future; the thread scores pieces of the waiting requests together (score(texts) -> rewards), at most
    batch_size texts per call, in arrival order, and before each call drops the requests whose client left."""

    def __init__(self, score, batch_size: int, max_wait_s: float):
        self.score, self.batch_size, self.max_wait_s = score, batch_size, max_wait_s
        self.cond = threading.Condition()
        self.waiting = collections.deque()      # Jobs in arrival order; the first may be partly scored
        self.arriving = 0                       # requests being read: worth a short wait
        self.stopping = False
        self.counts = {"requests": 0, "texts": 0, "batches": 0, "dropped": 0}
        self.thread = threading.Thread(target=self.run, name="scorer", daemon=True)

    def arrive(self):
        with self.cond:
            self.arriving += 1

    def leave(self):
        """A request that arrive()d and will not submit (refused, or its client left)."""
        with self.cond:
            self.arriving -= 1
            self.cond.notify()

    def submit(self, texts: list, gone=lambda: False) -> Future:
        job = Job(texts, gone)
        with self.cond:
            self.arriving -= 1
            self.waiting.append(job)
            self.cond.notify()
        return job.future

    def stop(self):
        """Drop what is still waiting (its requests get 503), finish the piece being scored, end the thread."""
        with self.cond:
            self.stopping = True
            while self.waiting:
                self.waiting.popleft().answer(error=Refusal(503, "the server stopped before scoring this request; "
                                                                 "send it again"))
            self.cond.notify()

    def drop_gone(self):
        """(cond held) Drop the waiting requests whose client has gone: nobody would read their rewards."""
        for job in [job for job in self.waiting if job.gone()]:
            self.waiting.remove(job)
            self.counts["dropped"] += 1
            job.answer(error=Disconnected())

    def next_batch(self) -> list | None:
        """Pieces (job, start, end) to score together, at most batch_size texts: the waiting requests in order,
        and those arriving within max_wait_s. None once stopped."""
        with self.cond:
            while True:
                if self.stopping:
                    return None
                self.drop_gone()
                if self.waiting:
                    break
                self.cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            pieces, n = [], 0
            while n < self.batch_size:
                if self.waiting:
                    job = self.waiting[0]
                    start = len(job.rewards)
                    end = min(len(job.texts), start + self.batch_size - n)
                    pieces.append((job, start, end))
                    n += end - start
                    if end == len(job.texts):
                        self.waiting.popleft()
                    continue
                left = deadline - time.monotonic()
                if not self.arriving or left <= 0 or self.stopping:
                    break
                self.cond.wait(left)
                self.drop_gone()
            return pieces

    def run(self):
        while (pieces := self.next_batch()) is not None:
            self.counts["batches"] += 1
            self.counts["texts"] += sum(end - start for _, start, end in pieces)
            self.score_batch(pieces)

    def score_batch(self, pieces: list):
        """Score the pieces' texts in one call and hand each request its share; a request whose texts are all
        scored gets its rewards. If the call fails, each piece is scored alone, so that only the request whose
        text broke it gets the error (and loses its other pieces): a UserError (a conversation the chat
        template refuses, ...) is the request's fault, 400; anything else is 500."""
        try:
            rewards = self.score([t for job, start, end in pieces for t in job.piece(start, end)])
        except Exception as e:
            if len(pieces) > 1:
                for piece in pieces:
                    self.score_batch([piece])
                return
            job = pieces[0][0]
            with self.cond:
                if job in self.waiting:
                    self.waiting.remove(job)
            job.answer(error=Refusal(400, str(e)) if isinstance(e, UserError) else
                       Refusal(500, f"scoring failed ({type(e).__name__}: {e}"[:500] + ")"))
            return
        offset = 0
        for job, start, end in pieces:
            job.rewards.extend(rewards[offset:offset + end - start])
            offset += end - start
            if len(job.rewards) == len(job.texts):
                self.counts["requests"] += 1
                job.answer(job.in_request_order())


# ----------------------------------------------------------------------------------------------
# Reading a request


def content_length(headers, max_body: int) -> int:
    """The body's size from its headers, refused before a byte of it is read when over max_body."""
    coding = ", ".join(headers.get_all("Transfer-Encoding") or [])
    if "chunked" in coding.lower():
        raise Refusal(411, "chunked bodies are not accepted; send the body with a Content-Length header")
    if coding:  # gzip, ...: the body is not what Content-Length counts as JSON; never read it as plain
        raise Refusal(501, f"Transfer-Encoding {coding!r:.60} is not supported; send the JSON body as it is, "
                           "with a Content-Length header")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise Refusal(411, "a POST needs a Content-Length header")
    if len(set(v.strip() for v in values)) > 1 or not re.fullmatch(r"[0-9]{1,19}", values[0].strip()):
        raise Refusal(400, f"Content-Length {', '.join(values)!r:.60} is not one whole number of bytes")
    length = int(values[0])
    if length > max_body:
        raise Refusal(413, f"the body is {length:,} bytes, over the limit of {max_body:,} (--max_body_mb); "
                           "send fewer texts per request")
    return length


JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')   # a JSON string, escapes included


def json_values_at_most(body: bytes, limit: int) -> bool:
    """Whether the JSON text holds at most about `limit` values, from its commas outside strings (a
    container's values but its first, an object's keys) without parsing: json.loads of a body of empty
    lists costs ~30x its bytes in memory and seconds that hold every thread. Nesting is bounded by
    json.loads itself (RecursionError). Commas inside strings are skipped string by string only when the
    plain count is over, and that walk stops after `limit` of them."""
    if body.count(b",") <= limit:
        return True
    commas, pos = 0, 0
    for string in JSON_STRING.finditer(body):
        commas += body.count(b",", pos, string.start())
        if commas > limit:
            return False
        pos = string.end()
    return commas + body.count(b",", pos) <= limit


def parse_query(body: bytes, max_texts: int) -> list:
    """The "query" of an OpenRLHF request body: a list of texts (strings) and conversations."""
    usage = 'send {"query": [texts or conversations]}'
    max_values = JSON_VALUES_PER_TEXT * max_texts
    if not json_values_at_most(body, max_values):
        raise Refusal(400, f"the body holds over {max_values:,} JSON values ({JSON_VALUES_PER_TEXT} per text of "
                           f"--max_texts {max_texts:,}); {usage}, split into several requests")
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise Refusal(400, f"the body is not valid JSON ({str(e)[:200]}); {usage}") from None
    if not isinstance(payload, dict) or "query" not in payload:
        raise Refusal(400, f"the body must be a JSON object with a \"query\" list; {usage}")
    query = payload["query"]
    if not isinstance(query, list):
        raise Refusal(400, f"\"query\" is a {type(query).__name__}, not a list; {usage}")
    if len(query) > max_texts:
        raise Refusal(400, f"\"query\" holds {len(query):,} texts, over the limit of {max_texts:,} per request "
                           "(--max_texts); split it into several requests")
    for i, item in enumerate(query):
        if isinstance(item, str):
            problem = None if item.isascii() or is_utf8(item) else "a string with unpaired surrogates"
        elif isinstance(item, list):
            problem = ("a list that is not a conversation" if not chat.is_conversation(item) else
                       "a conversation with unpaired surrogates" if not is_utf8(json.dumps(item, ensure_ascii=False))
                       else None)
        else:
            problem = JSON_TYPES.get(type(item), "not a text")
        if problem:
            raise Refusal(400, f"query[{i}] is {problem}; each item must be a text (a string) or a conversation "
                               "(a list of {\"role\": ..., \"content\": ...} messages)")
    return query


JSON_TYPES = {dict: "a JSON object", int: "a number", float: "a number", bool: "true or false", type(None): "null"}


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" parses as JSON but no tokenizer can encode it
        return False
    return True


# ----------------------------------------------------------------------------------------------
# HTTP


class RequestReader(io.RawIOBase):
    """A connection's socket as its handler reads it, with two bounds a socket timeout lacks: a request
    must arrive whole within `timeout_s` of its first byte (a client sending a byte every few seconds never
    trips the idle timeout), and its head (request line and headers) within MAX_HEAD_BYTES (http.server
    alone allows 100 header lines of 64 KiB). The idle timeout still closes a silent connection."""

    def __init__(self, sock, timeout_s: float):
        self.sock, self.timeout_s = sock, timeout_s
        self.next_request()

    def next_request(self):
        self.sock.settimeout(IDLE_TIMEOUT_S)            # (the last request's read may have shortened it)
        self.deadline = None                            # set by the request's first byte
        self.head_left = MAX_HEAD_BYTES + io.DEFAULT_BUFFER_SIZE   # (a buffered read may take some body too)

    def readable(self):
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the request did not arrive whole within {self.timeout_s:g} s")
            self.sock.settimeout(min(IDLE_TIMEOUT_S, left))
        n = self.sock.recv_into(buffer)
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        if self.head_left is not None:
            self.head_left -= n
            if self.head_left < 0:
                raise HeadTooLarge
        return n


def path_of(target: str) -> str | None:
    """The path of a request target, None when it is not one (`http://[::1/x`: urlsplit raises)."""
    try:
        return urlsplit(target).path
    except ValueError:
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: a client may send many requests on one connection
    default_request_version = "HTTP/1.0"  # so that the answer to a garbled request line has a status line
    server_version = "qwen3-rm-serve"
    timeout = IDLE_TIMEOUT_S
    body_read = False               # set per request: whether its body has been read (refuse() reads a small one)
    disable_nagle_algorithm = True  # TCP_NODELAY: else a small answer waits ~40 ms for the client's delayed ACK

    def setup(self):
        super().setup()
        self.reader = RequestReader(self.connection, self.server.request_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        """http.server's, with the request's bounds: its head over MAX_HEAD_BYTES is answered 431; a request
        not whole in time, or a client gone, closes the connection (one log line, never a traceback)."""
        self.reader.next_request()
        try:
            super().handle_one_request()
        except HeadTooLarge:
            self.requestline = getattr(self, "requestline", "")
            self.send_error(431, f"the request line and headers are over {MAX_HEAD_BYTES:,} bytes, the limit; "
                                 "send the texts in the body")
        except (ConnectionError, TimeoutError) as e:
            self.log_message("connection closed: %s", e)
            self.close_connection = True

    def client_gone(self) -> bool:
        """Whether the client has closed its connection while it waits for its answer (the scoring thread asks)."""
        try:
            poll = select.poll()
            poll.register(self.connection, select.POLLIN)
            return bool(poll.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    def dispatch(self, method: str):
        """Route the request and answer it; every failure becomes a JSON error, never a dead thread."""
        server = self.server
        self.body_read = False
        self.reader.head_left = None   # the head is read: what follows is the body
        with server.lock:
            server.in_flight += 1
        try:
            path = path_of(self.path)
            if path is None:
                raise Refusal(400, f"the request target {self.path!r:.100} is not a path; use POST /get_reward or "
                                   "GET /health")
            allowed = ROUTES.get(path)
            if allowed is None:
                raise Refusal(404, f"no such path {path!r:.100}; use POST /get_reward or GET /health")
            if method != allowed and not (method == "HEAD" and allowed == "GET"):
                raise Refusal(405, f"{path} takes {allowed}, not {method}", {"Allow": allowed})
            if path == "/health":
                self.send_json(*server.health(), body=method != "HEAD")
            else:
                rewards = self.read_and_score()
                self.send_json(200, {"rewards": rewards, "scores": rewards})
        except Refusal as e:
            self.refuse(e)
        except (Disconnected, ConnectionError, TimeoutError):
            self.close_connection = True   # the client is gone (or stalled): nothing to answer it
        except Exception as e:  # a bug of ours: this request gets a 500, the server goes on
            self.log_message("internal error: %r", e)
            self.send_error(500, f"internal error ({type(e).__name__})")
        finally:
            with server.lock:
                server.in_flight -= 1

    def handle_expect_100(self):
        """A client that asks before sending its body (curl does above 1 MiB) hears of a 413 (or any refusal of
        its headers) before sending it, and at once: the body it holds back is not waited for."""
        if self.command == "POST" and path_of(self.path) == "/get_reward":
            try:
                content_length(self.headers, self.server.max_body)
            except Refusal as e:
                self.body_read = True   # (nothing to read before answering: the client sends it only after a 100)
                self.refuse(e)
                return False
        return super().handle_expect_100()

    def refuse(self, e: Refusal):
        self.log_message("%s -> %d: %s", self.requestline[:200], e.status, str(e)[:300])
        try:
            self.discard_body(e.status)
            self.send_json(e.status, {"error": str(e)}, headers=e.headers, close=True)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def discard_body(self, status: int):
        """Read a small body that a refusal left unread before answering: closing a socket with unread data
        resets the connection, and the client would see the reset instead of our answer. A 413's body stays
        unread (that is its point)."""
        if self.body_read or status == 413 or self.command not in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            return
        length = self.headers.get("Content-Length", "").strip()
        if re.fullmatch(r"[0-9]{1,7}", length) and int(length) <= min(self.server.max_body, DISCARD_MAX):
            self.rfile.read(int(length))

    def read_and_score(self) -> list:
        server, batcher = self.server, self.server.batcher
        length = content_length(self.headers, server.max_body)
        if not server.hold(length):
            raise Refusal(503, f"the server holds {BODY_BUDGET} bodies' worth of requests (--max_body_mb) already; "
                               "send it again shortly", {"Retry-After": "1"})
        try:
            batcher.arrive()  # (while stopping too: a request that got here is in flight, and answered)
            try:
                body = self.rfile.read(length)
                self.body_read = True
                if len(body) < length:
                    raise Disconnected
                texts = parse_query(body, server.max_texts)
                del body
            except BaseException:
                batcher.leave()
                raise
            if not texts:
                batcher.leave()
                return []
            future = batcher.submit(texts, self.client_gone)
            try:
                return future.result(timeout=ANSWER_TIMEOUT_S)
            except FutureTimeout:
                raise Refusal(503, f"no scores after {ANSWER_TIMEOUT_S} s; the server is overloaded or stuck") from None
        finally:
            server.hold(-length)

    def send_json(self, status: int, obj: dict, headers: dict | None = None, close: bool = False,
                  body: bool = True):
        try:
            data = json.dumps(obj, allow_nan=False).encode()
        except ValueError:  # NaN or inf: not JSON, and not a reward anyone should train on
            status, close = 500, True
            data = json.dumps({"error": "the model returned a non-finite reward (NaN or inf)"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close or self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (an unknown method: 501, a malformed request line, headers too long)
        as JSON too."""
        self.close_connection = True
        if code == 414:  # http.server's own says just "414"
            message = (f"the request line is over {MAX_LINE:,} bytes, the limit; send the texts in the body of "
                       "POST /get_reward")
        self.log_message("%s -> %d: %s", getattr(self, "requestline", "")[:200], code, message)
        try:
            self.send_json(code, {"error": message or str(code)}, close=True)
            if code in (414, 431):
                self.drain()
        except (ConnectionError, TimeoutError):
            pass

    def drain(self):
        """Read and drop, briefly, what the client has sent beyond what we read (a head over the limit):
        closing over unread data resets the connection, and the client would see the reset, not our answer."""
        self.wfile.flush()
        self.connection.settimeout(0.2)
        for _ in range(16):
            if not self.connection.recv(65536):
                return

    def log_request(self, code="-", size="-"):
        pass  # answers are not logged (a busy server would drown its log); refusals are, by refuse()

    def log_message(self, format, *args):
        if not self.server.quiet:
            sys.stderr.write(f"serve: {self.address_string()} {format % args}\n")


class RewardServer(ThreadingHTTPServer):
    """The HTTP server and its scoring thread. start() serves in background threads; stop() drains."""
    daemon_threads = True          # a stalled connection never keeps the process alive
    request_queue_size = 128       # listen backlog: many clients connecting at once are not refused

    def __init__(self, address, batcher: Batcher, info: dict, max_body: int, max_texts: int, quiet=False,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S):
        super().__init__(address, Handler)
        self.batcher, self.info, self.max_body, self.max_texts, self.quiet = batcher, info, max_body, max_texts, quiet
        self.max_connections, self.request_timeout = max_connections, request_timeout
        self.lock = threading.Lock()
        self.in_flight = self.connections = self.held = 0   # requests being answered, connections, body bytes
        self.stopping = False
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="http", daemon=True)

    def hold(self, nbytes: int) -> bool:
        """Count nbytes of request bodies as held (negative: released); False, counting nothing, when that
        would take the bodies held at once over BODY_BUDGET * max_body."""
        with self.lock:
            if nbytes > 0 and self.held + nbytes > BODY_BUDGET * self.max_body:
                return False
            self.held += nbytes
            return True

    def process_request(self, request, client_address):
        """A thread per connection, up to max_connections; one more is answered 503 at once and closed."""
        with self.lock:
            full = self.connections >= self.max_connections
            self.connections += not full
        if not full:
            return super().process_request(request, client_address)
        body = json.dumps({"error": f"the server has {self.max_connections} connections open (--max_connections); "
                                    "send it again shortly"}).encode()
        try:
            request.setblocking(False)
            request.recv(65536)   # what the client sent already: closing over unread data would reset
        except OSError:
            pass
        try:
            request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.connections -= 1

    def handle_error(self, request, client_address):
        """A connection's thread ended by an exception we did not expect: one line, never a traceback."""
        if not self.quiet:
            e = sys.exc_info()[1]
            sys.stderr.write(f"serve: {client_address[0]} connection ended: {type(e).__name__}: {e}"[:300] + "\n")

    def health(self) -> tuple[int, dict]:
        if self.stopping:
            return 503, {"status": "stopping"}
        if not self.batcher.thread.is_alive():
            return 503, {"status": "down", "error": "the scoring thread has stopped"}
        return 200, {"status": "ok", **self.info, **self.batcher.counts}

    def start(self):
        self.batcher.thread.start()
        self.thread.start()
        return self

    def stop(self, grace_s: float = GRACE_S) -> int:
        """Stop accepting, give the requests in flight grace_s to be answered, then drop the rest (503) and
        stop the scoring thread after the piece it is scoring (up to STOP_S more). Returns how many requests
        were not answered with their rewards (0: all were)."""
        self.stopping = True
        self.shutdown()                # the accept loop ends; handler threads go on
        self.server_close()            # new connections are refused, not left waiting in the backlog
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.in_flight
        self.batcher.stop()
        self.batcher.thread.join(STOP_S)
        deadline = time.monotonic() + 1  # the dropped requests' 503s are on their way
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        return left


# ----------------------------------------------------------------------------------------------
# The command line


def is_loopback(host: str) -> bool:
    """Whether an address is this machine only: localhost, 127.x.y.z in any form inet_aton takes (127.1), ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host)).is_loopback
    except OSError:
        return False


def exposure_warning(host: str) -> str | None:
    if is_loopback(host):
        return None
    return (f"warning: listening on {host}, beyond this machine, with no authentication: anyone who can reach "
            "the port can use the model; bind to 127.0.0.1 or put it behind a proxy that checks clients")


def load_model(args):
    """(model, max_length, what /health reports) for CHECKPOINT, found and checked as eval.py does."""
    import torch
    from support.scoring import scoring_length
    from support.validate import trained_settings
    from rm import RewardModel
    from support.hub import find_model_dir
    model_dir, _ = find_model_dir(args.checkpoint)
    trained_settings(model_dir)  # a plain language model (a random head) is refused here
    tokenizer.require_file(model_dir)
    model = RewardModel.from_pretrained(str(model_dir), device=args.device,
                                        dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if args.chat_template:
        model.tokenizer.chat_format(args.chat_template)  # a PATH replaces the model's template
    if args.normalize and model.reward_stats is None:
        raise UserError(f"--normalize needs the reward mean and std in {model_dir}/config.json and it has none; "
                        f"save them with python eval.py {args.checkpoint} --save_reward_stats, or drop --normalize")
    max_length = scoring_length(model, args.max_length)  # score()'s rule: one model, one reward
    info = {"model": str(model_dir), "head": model.head_type, "pooling": model.pooling, "max_length": max_length,
            "batch_size": args.batch_size, "device": args.device, "normalize": args.normalize,
            **({"reward_stats": model.reward_stats} if args.normalize else {})}
    return model, max_length, info


def make_server(score, info: dict, args) -> RewardServer:
    """Bind the server (not yet serving); score(texts) -> rewards runs in its scoring thread."""
    batcher = Batcher(score, args.batch_size, args.max_wait_ms / 1000)
    try:
        return RewardServer((args.host, args.port), batcher, info, max_body=int(args.max_body_mb * 2**20),
                            max_texts=args.max_texts, quiet=getattr(args, "quiet", False),
                            max_connections=getattr(args, "max_connections", DEFAULT_MAX_CONNECTIONS),
                            request_timeout=getattr(args, "request_timeout", DEFAULT_REQUEST_TIMEOUT_S))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port "
                        "or --host") from None


def parse_args(argv=None):
    import torch
    p = ArgumentParser(prog="python -m tools.serve", description="Serve a reward model over HTTP, as OpenRLHF's "
                       "remote reward model: POST /get_reward {\"query\": [texts]} -> {\"rewards\": [...]}.")
    p.add_argument("checkpoint", help="a model directory, a train.py checkpoint or output directory, or a Hub id "
                                      "of a Qwen3ForSequenceClassification reward model (as eval.py)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; there is no authentication)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000, OpenRLHF's; 0: any free port)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="texts per forward pass, and the most "
                   "texts gathered from several requests into one batch (default: 32)")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a batch waits for requests that are "
                   "being read when it is not full (default: 5)")
    p.add_argument("--max_length", type=positive_int, default=None, help="tokens per text: a longer one keeps its "
                   "last max_length tokens, as training does (default: the training max_length, else the model's "
                   "max_position_embeddings, as score())")
    p.add_argument("--normalize", action="store_true", help="answer (reward - mean) / std with the statistics "
                   "saved in config.json (eval.py --save_reward_stats), as score(normalize=True)")
    p.add_argument("--max_body_mb", type=float, default=DEFAULT_MAX_BODY_MB,
                   help=f"larger request bodies are refused with 413, unread (default: {DEFAULT_MAX_BODY_MB})")
    p.add_argument("--max_texts", type=positive_int, default=DEFAULT_MAX_TEXTS,
                   help=f"most texts per request (default: {DEFAULT_MAX_TEXTS})")
    p.add_argument("--max_connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"connections at once; one more is answered 503 (default: {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--request_timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="SECONDS",
                   help="a request (line, headers, body) must arrive whole within this of its first byte, else the "
                        f"connection is closed (default: {DEFAULT_REQUEST_TIMEOUT_S})")
    p.add_argument("--shutdown_grace", type=float, default=GRACE_S, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long the requests in flight have to be answered before what still "
                        f"waits is answered 503 (default: {GRACE_S})")
    p.add_argument("--chat_template", default=None, metavar="PATH",
                   help="render conversations with this .jinja file instead of the model's chat template")
    p.add_argument("--bf16", action="store_true", help="load the weights in bfloat16")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--quiet", action="store_true", help="do not log refused requests on stderr")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port; use 1 to 65535 (0: any free port)")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max_length {args.max_length} is too small; use at least 2 (one token + eos)")
    if not (0 <= args.max_wait_ms <= 10_000):
        raise UserError(f"--max_wait_ms {args.max_wait_ms} must be from 0 to 10000")
    if not (0 <= args.shutdown_grace <= 3600):
        raise UserError(f"--shutdown_grace {args.shutdown_grace} must be from 0 to 3600 seconds")
    if not (0 < args.request_timeout <= 3600):
        raise UserError(f"--request_timeout {args.request_timeout} must be above 0 and at most 3600 seconds")
    if not (0 < args.max_body_mb <= 4096):
        raise UserError(f"--max_body_mb {args.max_body_mb} must be above 0 and at most 4096")
    from support.validate import check_paths
    check_paths({"CHECKPOINT": args.checkpoint, "--chat_template": args.chat_template})  # before any disk access
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise UserError(f"--chat_template {args.chat_template}: no such file; give a .jinja file")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is available to torch; use --device cpu")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    loaded = {}
    server = make_server(lambda texts: loaded["model"].score(texts, batch_size=args.batch_size,
                                                             max_length=loaded["max_length"],
                                                             normalize=args.normalize), {}, args)
    try:  # bound first: a port in use is refused in a second, not after loading the weights
        loaded["model"], loaded["max_length"], info = load_model(args)
    except BaseException:
        server.server_close()
        raise
    server.info.update(info)
    host, port = server.server_address[:2]
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():  # the second one: at once
            print("serve: stopped at once (second signal)", file=sys.stderr, flush=True)
            leave(130)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"serving {info['model']} ({info['head']} head, max_length {info['max_length']}, batch_size {args.batch_size}, "
          f"{args.device}) on http://{host}:{port}/get_reward", flush=True)
    if exposure_warning(host) and (warning := exposure_warning(args.host)):  # (host: the address it bound)
        print(warning, file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    print(f"serve: stopping; answering the {server.in_flight} request(s) in flight", flush=True)
    left = server.stop(args.shutdown_grace)
    if left:
        print(f"serve: {left} request(s) still unanswered after {args.shutdown_grace:g} s were dropped (503)",
              file=sys.stderr, flush=True)
    print("serve: stopped", flush=True)
    if server.batcher.thread.is_alive():
        leave(0)


def leave(status: int):
    """Exit now, without the interpreter's shutdown: it would tear the process down under a forward pass
    still running in the scoring thread (C++ std::terminate, SIGABRT)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    run_cli(main)
