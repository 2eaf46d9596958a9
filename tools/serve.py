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
- It never falls over: every refusal is a JSON {"error": "..."} with its status code (docs/serving.md
  lists them and the limits); a failure inside the model answers 500 only to the requests whose texts fail.
  SIGTERM or Ctrl-C stops accepting, answers the requests in flight and exits 0 (a second one: at once).
- No authentication: bind to loopback (the default) or put it behind something that checks clients.
"""
import collections
import ipaddress
import json
import re
import signal
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from support.cli import positive_int
from support import chat, tokenizer
from support.errors import ArgumentParser, UserError, run_cli

ROUTES = {"/get_reward": "POST", "/health": "GET"}   # path -> the one method it takes
DEFAULT_MAX_BODY_MB = 32         # a body over this is refused (413) from its Content-Length, unread
DEFAULT_MAX_TEXTS = 1024         # texts per request
ANSWER_TIMEOUT_S = 600           # a request waits this long for its scores at most (then 503)
IDLE_TIMEOUT_S = 30              # a connection silent this long (idle keep-alive, a stalled body) is closed
DISCARD_MAX = 1 << 20           # a refused request's unread body up to this size is read before answering
GRACE_S = 10                     # on SIGTERM/Ctrl-C, how long the requests in flight have to finish


class Refusal(Exception):
    """A request we do not serve: answered with `status` and {"error": message}, then the connection closes."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class Disconnected(Exception):
    """The client went away before its request was read whole: nothing to answer."""


# ----------------------------------------------------------------------------------------------
# The scoring thread


class Batcher:
    """The one thread that runs the model. Handler threads submit() a request's texts and wait on the
    Future; the thread scores the texts of every request waiting together (score(texts) -> rewards)."""

    def __init__(self, score, batch_size: int, max_wait_s: float):
        self.score, self.batch_size, self.max_wait_s = score, batch_size, max_wait_s
        self.cond = threading.Condition()
        self.waiting = collections.deque()      # (texts, Future) in arrival order
        self.arriving = 0                       # requests being read: worth a short wait
        self.stopping = False
        self.counts = {"requests": 0, "texts": 0, "batches": 0}
        self.thread = threading.Thread(target=self.run, name="scorer", daemon=True)

    def arrive(self):
        with self.cond:
            self.arriving += 1

    def leave(self):
        """A request that arrive()d and will not submit (refused, or its client left)."""
        with self.cond:
            self.arriving -= 1
            self.cond.notify()

    def submit(self, texts: list) -> Future:
        future = Future()
        with self.cond:
            self.arriving -= 1
            self.waiting.append((texts, future))
            self.cond.notify()
        return future

    def stop(self):
        """Finish what is waiting, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def next_batch(self) -> list | None:
        """The requests to score together: all waiting ones, and those arriving within max_wait_s, until
        batch_size texts. None once stopped with nothing left."""
        with self.cond:
            while not self.waiting:
                if self.stopping:
                    return None
                self.cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            batch, n = [], 0
            while n < self.batch_size:
                if self.waiting:
                    batch.append(self.waiting.popleft())
                    n += len(batch[-1][0])
                    continue
                left = deadline - time.monotonic()
                if not self.arriving or left <= 0 or self.stopping:
                    break
                self.cond.wait(left)
            return batch

    def run(self):
        while (batch := self.next_batch()) is not None:
            self.counts["batches"] += 1
            self.counts["requests"] += len(batch)
            self.counts["texts"] += sum(len(texts) for texts, _ in batch)
            self.score_batch(batch)

    def score_batch(self, batch: list):
        """Score the batch's texts in one call and hand each request its share. If that fails, each request
        is scored alone, so that only the one whose text broke it gets the error: a UserError (a
        conversation the chat template refuses, ...) is the request's fault, 400; anything else is 500."""
        try:
            rewards = self.score([t for texts, _ in batch for t in texts])
        except Exception as e:
            if len(batch) > 1:
                for job in batch:
                    self.score_batch([job])
                return
            if isinstance(e, UserError):
                batch[0][1].set_exception(Refusal(400, str(e)))
            else:
                batch[0][1].set_exception(Refusal(500, f"scoring failed ({type(e).__name__}: {e}"[:500] + ")"))
            return
        start = 0
        for texts, future in batch:
            future.set_result(rewards[start:start + len(texts)])
            start += len(texts)


# ----------------------------------------------------------------------------------------------
# Reading a request


def content_length(headers, max_body: int) -> int:
    """The body's size from its headers, refused before a byte of it is read when over max_body."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        raise Refusal(411, "chunked bodies are not accepted; send the body with a Content-Length header")
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


def parse_query(body: bytes, max_texts: int) -> list:
    """The "query" of an OpenRLHF request body: a list of texts (strings) and conversations."""
    usage = 'send {"query": [texts or conversations]}'
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
            problem = None if chat.is_conversation(item) else "a list that is not a conversation"
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: a client may send many requests on one connection
    default_request_version = "HTTP/1.0"  # so that the answer to a garbled request line has a status line
    server_version = "qwen3-rm-serve"
    timeout = IDLE_TIMEOUT_S
    body_read = False               # set per request: whether its body has been read (refuse() reads a small one)
    disable_nagle_algorithm = True  # TCP_NODELAY: else a small answer waits ~40 ms for the client's delayed ACK

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
        with server.lock:
            server.in_flight += 1
        try:
            path = urlsplit(self.path).path
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
        """A client that asks before sending its body (curl does above 1 MiB) hears of a 413 before sending it."""
        if self.command == "POST" and urlsplit(self.path).path == "/get_reward":
            try:
                content_length(self.headers, self.server.max_body)
            except Refusal as e:
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
        batcher.arrive()  # (while stopping too: a request that got here is in flight, and answered)
        try:
            length = content_length(self.headers, server.max_body)
            body = self.rfile.read(length)
            self.body_read = True
            if len(body) < length:
                raise Disconnected
            texts = parse_query(body, server.max_texts)
        except BaseException:
            batcher.leave()
            raise
        future = batcher.submit(texts)
        try:
            rewards = future.result(timeout=ANSWER_TIMEOUT_S)
        except FutureTimeout:
            raise Refusal(503, f"no scores after {ANSWER_TIMEOUT_S} s; the server is overloaded or stuck") from None
        return rewards

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
        self.log_message("%s -> %d: %s", self.requestline[:200], code, message)
        try:
            self.send_json(code, {"error": message or str(code)}, close=True)
        except (ConnectionError, TimeoutError):
            pass

    def log_request(self, code="-", size="-"):
        pass  # answers are not logged (a busy server would drown its log); refusals are, by refuse()

    def log_message(self, format, *args):
        if not self.server.quiet:
            sys.stderr.write(f"serve: {self.address_string()} {format % args}\n")


class RewardServer(ThreadingHTTPServer):
    """The HTTP server and its scoring thread. start() serves in background threads; stop() drains."""
    daemon_threads = True          # a stalled connection never keeps the process alive
    request_queue_size = 128       # listen backlog: many clients connecting at once are not refused

    def __init__(self, address, batcher: Batcher, info: dict, max_body: int, max_texts: int, quiet=False):
        super().__init__(address, Handler)
        self.batcher, self.info, self.max_body, self.max_texts, self.quiet = batcher, info, max_body, max_texts, quiet
        self.lock = threading.Lock()
        self.in_flight = 0
        self.stopping = False
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="http", daemon=True)

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
        """Stop accepting, give the requests in flight grace_s to be answered, stop the scoring thread.
        Returns how many requests were still in flight (0: all answered)."""
        self.stopping = True
        self.shutdown()                # the accept loop ends; handler threads go on
        self.server_close()            # new connections are refused, not left waiting in the backlog
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        self.batcher.stop()
        self.batcher.thread.join(max(0.0, deadline - time.monotonic()))
        return self.in_flight


# ----------------------------------------------------------------------------------------------
# The command line


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
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
            "batch_size": args.batch_size, "device": args.device,
            "normalize": model.reward_stats if args.normalize else None}
    return model, max_length, info


def make_server(score, info: dict, args) -> RewardServer:
    """Bind the server (not yet serving); score(texts) -> rewards runs in its scoring thread."""
    batcher = Batcher(score, args.batch_size, args.max_wait_ms / 1000)
    try:
        return RewardServer((args.host, args.port), batcher, info, max_body=int(args.max_body_mb * 2**20),
                            max_texts=args.max_texts, quiet=getattr(args, "quiet", False))
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
    if not (0 < args.max_body_mb <= 4096):
        raise UserError(f"--max_body_mb {args.max_body_mb} must be above 0 and at most 4096")
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
            sys.exit(130)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"serving {info['model']} ({info['head']} head, max_length {info['max_length']}, batch_size {args.batch_size}, "
          f"{args.device}) on http://{host}:{port}/get_reward", flush=True)
    if warning := exposure_warning(args.host):
        print(warning, file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    print(f"serve: stopping; answering the {server.in_flight} request(s) in flight", flush=True)
    left = server.stop(GRACE_S)
    if left:
        print(f"serve: {left} request(s) still unanswered after {GRACE_S} s were dropped", file=sys.stderr, flush=True)
    print("serve: stopped", flush=True)


if __name__ == "__main__":
    run_cli(main)
