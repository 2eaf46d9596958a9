"""tools/serve.py: the real server in a subprocess, over real HTTP, against RewardModel.score.

Every wait is bounded (socket timeouts, deadlines), so a regression fails instead of hanging.
"""
import argparse
import copy
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ROOT
from qwen3 import SHAPES
from rm import RewardModel
from support.demo import demo_rows
from support.errors import UserError
from tools import serve

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
MAX_LENGTH = 48          # the saved training max_length: the server's default truncation
MAX_BODY_MB = 0.0625     # 64 KiB: small, so that 413 is cheap to test
MAX_TEXTS = 16
TIMEOUT = 30
STATS = {"mean": 0.75, "std": 2.5, "n": 100}   # saved with the model: --normalize answers (r - 0.75) / 2.5


def conversation(i):
    return [{"role": "user", "content": "any tips on chess?"}, {"role": "assistant", "content": f"sure! knight {i}"}]


TEXTS = [row[k] for row in list(demo_rows("test"))[:20] for k in ("chosen", "rejected")]
LONG = "\n\nHuman: tell me about cats." + " whiskers purring fur" * 40 + "\n\nAssistant: kitten"   # > MAX_LENGTH
ITEMS = TEXTS + [conversation(i) for i in range(4)] + [LONG]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_tok):
    """A tiny demo-tokenizer reward model with a chat template, rewards of order 1 (not 0.01), saved."""
    demo_tok = copy.copy(demo_tok)  # the session's tokenizer stays without a template for the other test files
    demo_tok.chat_template = TEMPLATE
    config = dataclasses.replace(SHAPES["tiny"], vocab_size=demo_tok.vocab_size)
    torch.manual_seed(0)
    model = RewardModel(config, head="mlp", pooling="last")
    model.model.init_weights(seed=0)
    model.init_head(0)
    with torch.no_grad():
        model.head.fc2.weight.mul_(300)
    model.tokenizer, model.provenance = demo_tok, {"max_length": MAX_LENGTH, "reward_stats": STATS}
    return model.save_pretrained(tmp_path_factory.mktemp("serve") / "rm")


@pytest.fixture(scope="module")
def reference(model_dir):
    """score(item) for every item the tests send, as RewardModel.score gives it (and normalised)."""
    model = RewardModel.from_pretrained(str(model_dir))
    normalized = dict(zip(map(key, ITEMS), model.score(ITEMS, max_length=MAX_LENGTH, normalize=True)))
    return model, dict(zip(map(key, ITEMS), model.score(ITEMS, max_length=MAX_LENGTH))), normalized


def key(item):
    return json.dumps(item)


def start_server(model_dir, log_path, *extra):
    """`python -m tools.serve` on a free loopback port (--port 0: the port it prints). -> (process, port)"""
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve", str(model_dir), "--port", "0", "--device", "cpu",
                             "--batch_size", "8", "--max_wait_ms", "20", "--max_body_mb", str(MAX_BODY_MB),
                             "--max_texts", str(MAX_TEXTS), *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)/get_reward", log_path.read_text())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the server did not start:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    proc, port = start_server(model_dir, log_path)
    yield port
    proc.terminate()
    try:
        assert proc.wait(timeout=15) == 0, log_path.read_text()
    finally:
        proc.kill()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


def request(port, method="POST", path="/get_reward", body=None, headers=None):
    """(status, JSON answer) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def raw_request(port, data: bytes):
    """Send bytes as they are (headers we choose, a body shorter than announced, ...) -> (status, JSON)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, json.loads(response.read())


def assert_rewards(answer, items, expected):
    assert set(answer) == {"rewards", "scores"} and answer["rewards"] == answer["scores"]
    assert len(answer["rewards"]) == len(items)
    for got, item in zip(answer["rewards"], items):
        assert abs(got - expected[key(item)]) < 1e-5, (item, got, expected[key(item)])


def assert_healthy(port, expected):
    status, health = request(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok", health
    status, answer = request(port, body={"query": ITEMS[:3]})
    assert status == 200
    assert_rewards(answer, ITEMS[:3], expected)


# ----------------------------------------------------------------------------------------------


def test_rewards_are_score_in_order_with_openrlhf_body(server, reference):
    model, expected, _ = reference
    status, answer = request(server, body={"query": ITEMS[:MAX_TEXTS], "prompts": ["p"] * MAX_TEXTS,
                                           "labels": [None] * MAX_TEXTS})
    assert status == 200
    assert_rewards(answer, ITEMS[:MAX_TEXTS], expected)
    # conversations through the chat template, and the truncation rule: a long text keeps its last MAX_LENGTH tokens
    tail = ITEMS[-5:]
    status, answer = request(server, body={"query": tail})
    assert status == 200
    assert_rewards(answer, tail, expected)
    assert abs(answer["rewards"][-1] - model.score([LONG], max_length=2048)[0]) > 1e-3  # truncated: not the whole text's reward
    assert request(server, body={"query": []}) == (200, {"rewards": [], "scores": []})


def test_one_long_text_gets_one_reward_on_every_path(server, model_dir, tmp_path):
    """One model, one reward: a text longer than the training max_length saved with the model gets the same
    reward from score, score_responses, reward_function (lone and grouped), the server over HTTP and eval.py
    --benchmark, none of them given a max_length (scoring.scoring_length decides for all). Before, score()
    and reward_function cut at max_position_embeddings, the server and --benchmark at max_length."""
    import eval as eval_cli
    from support.benchmarks import REWARDS_FILE, transcript
    model = RewardModel.from_pretrained(str(model_dir))
    prompt, response = "tell me about cats." + " whiskers purring fur" * 40, "kitten"
    text = transcript(prompt) + response                            # how --benchmark renders a row
    assert len(model.tokenizer.sequence(text)) > MAX_LENGTH          # long enough that the cut matters
    [reward] = model.score([text])
    assert abs(reward - model.score([text], max_length=2048)[0]) > 1e-3  # ... and changes the reward
    assert reward == pytest.approx(model.score([text], max_length=MAX_LENGTH)[0], abs=1e-6)
    paths = {"score_responses": model.score_responses(transcript(prompt), [response])[0],
             "reward_function, lone": model.reward_function()([transcript(prompt)], [response])[0],
             "reward_function, grouped": model.reward_function()([transcript(prompt)] * 2, [response, "cat"])[0],
             "server": request(server, body={"query": [text]})[1]["rewards"][0]}
    row = {"prompt": prompt, "chosen": response, "chosen_model": "a", "rejected": "dog", "rejected_model": "b",
           "subset": "alpacaeval-easy", "id": 0}
    (tmp_path / "rb.jsonl").write_text(json.dumps(row) + "\n")
    report = tmp_path / "out" / "evaluation_report.json"
    eval_cli.main([str(model_dir), "--benchmark", "rewardbench", "--dataset", str(tmp_path / "rb.jsonl"),
                   "--chat_template", "none", "--output", str(report), "--no_progress", "--device", "cpu"])
    paths["eval.py --benchmark"] = json.loads((report.parent / REWARDS_FILE).read_text())["chosen"][0]
    assert paths == pytest.approx({name: reward for name in paths}, abs=1e-5)
    assert request(server, method="GET", path="/health")[1]["max_length"] == MAX_LENGTH


def test_openrlhf_client_as_it_posts(server, reference):
    """What OpenRLHF's remote-RM client does: requests.post(url, json={"query", "prompts", "labels"}),
    raise_for_status, then the "rewards" key (its agent path reads "scores" too). requests is in
    requirements-dev.txt: this test runs everywhere the suite does, never skipped."""
    import requests
    items = TEXTS[:3]
    response = requests.post(f"http://127.0.0.1:{server}/get_reward", timeout=180,
                             json={"query": items, "prompts": ["\n\nHuman: hi"] * 3, "labels": [""] * 3},
                             headers={"Content-Type": "application/json"})
    response.raise_for_status()
    assert_rewards(response.json(), items, reference[1])


def test_32_concurrent_clients_all_correct_and_batched(server, reference):
    _, expected, _ = reference
    before = request(server, "GET", "/health")[1]

    def client(c):
        for r in range(3):  # each client sends 1-3 texts per request, different ones per client
            items = [ITEMS[(c * 7 + r * 3 + j) % len(ITEMS)] for j in range(1 + (c + r) % 3)]
            status, answer = request(server, body={"query": items})
            assert status == 200, answer
            assert_rewards(answer, items, expected)
        return True

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(client, range(32), timeout=120))
    after = request(server, "GET", "/health")[1]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 96 and batches < requests, (requests, batches)  # requests that came together were scored together


BIG = 10 ** 12
BAD = {  # name: (raw request bytes, status, words of the error)
    "malformed JSON": (b'{"query": [', 400, "not valid JSON"),
    "not an object": (b'["a"]', 400, "JSON object"),
    "no query": (b'{"prompts": ["a"]}', 400, "JSON object"),
    "query a string": (b'{"query": "a text"}', 400, "not a list"),
    "query item a number": (b'{"query": ["a", 3]}', 400, "query[1]"),
    "query item an object": (b'{"query": [{"role": "user"}]}', 400, "query[0]"),
    "message without content": (b'{"query": [[{"role": "user"}]]}', 400, "query[0]"),
    "unpaired surrogate": (b'{"query": ["\\ud800"]}', 400, "surrogates"),
    "unpaired surrogate in a conversation": (b'{"query": [[{"role": "user", "content": "a\\udc00"}]]}', 400,
                                             "a conversation with unpaired surrogates"),
    "more JSON values than texts can need": (b'{"query": ["a"], "labels": [' + b"0," * 2000 + b'0]}', 400,
                                             f"over {64 * MAX_TEXTS:,} JSON values"),
    "invalid UTF-8": (b'{"query": ["\xff\xfe"]}', 400, "not valid JSON"),
    "deep nesting": (b"[" * 50_000, 400, "not valid JSON"),
    "too many texts": (json.dumps({"query": ["a"] * (MAX_TEXTS + 1)}).encode(), 400, "--max_texts"),
    "role the template refuses": (json.dumps({"query": [[{"role": "robot", "content": "x"}]]}).encode(), 400,
                                  "unknown role"),
}


def post_bytes(body, length=None, extra=""):
    length = len(body) if length is None else length
    return (f"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            f"{extra}\r\n").encode() + body


HEADER_CASES = {  # name: (raw request, status, words)
    "body over the limit (refused unread)": (post_bytes(b"", length=BIG), 413, "over the limit"),
    "body just over the limit": (post_bytes(b"", length=int(MAX_BODY_MB * 2**20) + 1), 413, "--max_body_mb"),
    "no Content-Length": (b"POST /get_reward HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
    "Content-Length not a number": (b"POST /get_reward HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "whole number"),
    "negative Content-Length": (b"POST /get_reward HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "whole number"),
    "two Content-Lengths": (b"POST /get_reward HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
                            "whole number"),
    "chunked": (b"POST /get_reward HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "chunked"),
    "unknown path": (b"GET /v1/score HTTP/1.1\r\n\r\n", 404, "no such path"),
    "POST to an unknown path": (post_bytes(b'{"query": ["a"]}').replace(b"/get_reward", b"/reward"), 404, "no such path"),
    "GET /get_reward": (b"GET /get_reward HTTP/1.1\r\n\r\n", 405, "takes POST"),
    "POST /health": (post_bytes(b"{}").replace(b"/get_reward", b"/health"), 405, "takes GET"),
    "PUT /get_reward": (post_bytes(b"{}").replace(b"POST", b"PUT"), 405, "takes POST"),
    "unknown method": (b"BREW /get_reward HTTP/1.1\r\n\r\n", 501, "Unsupported method"),
    "garbage request line": (b"\x00\x01 nonsense\r\n\r\n", 400, "Bad"),
    "malformed request target": (post_bytes(b"{}").replace(b"/get_reward", b"http://[::1/get_reward"), 400,
                                 "is not a path"),
    "malformed target, Expect: 100-continue": (post_bytes(b"{}", extra="Expect: 100-continue\r\n").replace(
        b"/get_reward", b"http://[::1/get_reward"), 400, "is not a path"),
    "Transfer-Encoding gzip with a Content-Length": (post_bytes(b'{"query": ["a"]}', extra="Transfer-Encoding: "
                                                                "gzip\r\n"), 501, "'gzip' is not supported"),
    "request line too long": (b"GET /" + b"a" * 65_600 + b" HTTP/1.1\r\n\r\n", 414,
                              "the request line is over 65,536 bytes, the limit"),
    "headers over 64 KiB": (b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 1000 + b"\r\n" * 1
                            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(75)) + b"\r\n", 431,
                            "request line and headers are over 65,536 bytes"),
}


@pytest.mark.parametrize("name", list(BAD) + list(HEADER_CASES))
def test_bad_request_gets_its_status_and_the_server_stays_up(server, reference, name):
    data, status, words = (post_bytes(BAD[name][0]), *BAD[name][1:]) if name in BAD else HEADER_CASES[name]
    got, answer = raw_request(server, data)
    assert got == status and words in answer["error"], (got, answer)
    assert_healthy(server, reference[1])


def test_a_body_of_exactly_the_limit_is_served_and_head_health_has_no_body(server, reference):
    item = ITEMS[0]
    body = json.dumps({"query": [item]}).encode().ljust(int(MAX_BODY_MB * 2**20))  # JSON, then spaces
    status, answer = request(server, body=body)
    assert status == 200
    assert_rewards(answer, [item], reference[1])
    with socket.create_connection(("127.0.0.1", server), timeout=TIMEOUT) as s:  # raw: http.client reads no HEAD body
        s.sendall(b"HEAD /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in head and body == b"", data
    status, health = request(server, "GET", "/health")
    assert health["normalize"] is False and "reward_stats" not in health  # (with --normalize: true, and the stats)


def test_expect_100_continue_over_the_limit_is_refused_before_the_body_is_sent(server, reference):
    with socket.create_connection(("127.0.0.1", server), timeout=TIMEOUT) as s:
        s.sendall(post_bytes(b"", length=BIG, extra="Expect: 100-continue\r\n"))
        assert s.recv(100).startswith(b"HTTP/1.1 413 ")  # not "100 Continue"
    # any refusal of the headers comes at once, without waiting for the body the client holds back
    with socket.create_connection(("127.0.0.1", server), timeout=TIMEOUT) as s:
        start = time.monotonic()
        s.sendall(post_bytes(b"", length=10, extra="Expect: 100-continue\r\nTransfer-Encoding: gzip\r\n"))
        assert s.recv(100).startswith(b"HTTP/1.1 501 ") and time.monotonic() - start < 5
    assert_healthy(server, reference[1])


def test_clients_that_disconnect_mid_request_cost_nothing(server, reference):
    body = json.dumps({"query": ITEMS[:4]}).encode()
    with socket.create_connection(("127.0.0.1", server), timeout=TIMEOUT) as s:  # half a body, then gone
        s.sendall(post_bytes(body[:10], length=len(body)))
    for _ in range(8):  # a whole request, gone before the answer
        with socket.create_connection(("127.0.0.1", server), timeout=TIMEOUT) as s:
            s.sendall(post_bytes(body))
    with socket.create_connection(("127.0.0.1", server), timeout=TIMEOUT) as s:  # headers only, then gone
        s.sendall(b"POST /get_reward HTTP/1.1\r\nContent-")
    for _ in range(3):
        assert_healthy(server, reference[1])


@pytest.mark.parametrize("sig,normalize", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_signal_answers_requests_in_flight_and_exits_0(model_dir, reference, tmp_path, sig, normalize):
    """A request whose body is still on its way when the signal comes is answered, right; then exit 0.
    (The Ctrl-C server runs with --normalize: its answers are score(normalize=True).)"""
    proc, port = start_server(model_dir, tmp_path / "server.log", *["--normalize"] * normalize)
    try:
        items = ITEMS[:5]
        body = json.dumps({"query": items}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(post_bytes(b"", length=len(body), extra="Expect: 100-continue\r\n"))
            assert s.recv(100).startswith(b"HTTP/1.1 100")  # the server is reading this request now
            time.sleep(0.3)  # from "100 Continue" to counting itself in flight: microseconds, on a busy machine more
            proc.send_signal(sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until it stops accepting new connections
                try:
                    request(port, "GET", "/health")
                except ConnectionError:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the server still accepts connections 10 s after the signal")
            s.sendall(body)
            response = http.client.HTTPResponse(s)
            response.begin()
            assert response.status == 200
            assert_rewards(json.loads(response.read()), items, reference[2 if normalize else 1])
        assert proc.wait(timeout=10) == 0
        log = (tmp_path / "server.log").read_text()
        assert "serve: stopped" in log and "Traceback" not in log, log
    finally:
        proc.kill()


# ---- in process: the scoring thread with a stand-in model ----------------------------------------


def in_process_server(score, batch_size=8, max_wait_ms=20, **limits):
    args = argparse.Namespace(**{"host": "127.0.0.1", "port": 0, "batch_size": batch_size, "max_wait_ms": max_wait_ms,
                                 "max_body_mb": 1, "max_texts": 64, "quiet": True, **limits})
    server = serve.make_server(score, {"model": "stand-in"}, args).start()
    return server, server.server_address[1]


def test_model_errors_answer_500_to_their_request_only_and_the_server_goes_on():
    calls = []

    def score(texts):
        calls.append(len(texts))
        if any("boom" in t for t in texts):
            raise RuntimeError("CUDA out of memory (simulated)")
        if any("template" in t for t in texts):
            raise UserError("score: the chat template failed (simulated)")
        return [float("nan") if "nan" in t else float(len(t)) for t in texts]  # a NaN is one row's

    server, port = in_process_server(score)
    try:
        queries = [["ok", "fine"], ["boom"], ["a template"], ["nan"], ["three"], ["longest one", "ok", "mid"]] * 4
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda q: request(port, body={"query": q}), queries, timeout=60))
        for q, (status, answer) in zip(queries, answers):
            if q == ["boom"]:
                assert status == 500 and "RuntimeError: CUDA out of memory" in answer["error"]
            elif q == ["a template"]:
                assert status == 400 and "chat template failed" in answer["error"]
            elif q == ["nan"]:
                assert status == 500 and "non-finite" in answer["error"]
            else:
                assert status == 200 and answer["rewards"] == [float(len(t)) for t in q]
        assert request(port, "GET", "/health")[0] == 200
        assert request(port, body={"query": ["after"]}) == (200, {"rewards": [5.0], "scores": [5.0]})
    finally:
        assert server.stop(5) == 0


def test_concurrent_requests_share_forward_passes_of_at_most_batch_size():
    sizes = []

    def score(texts):
        sizes.append(len(texts))
        time.sleep(0.02)  # a forward pass takes time: requests pile up meanwhile
        return [float(len(t)) for t in texts]

    server, port = in_process_server(score, batch_size=8)
    try:
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: request(port, body={"query": ["x" * i]}), range(64), timeout=60))
        assert [a for a in answers] == [(200, {"rewards": [float(i)], "scores": [float(i)]}) for i in range(64)]
        assert sum(sizes) == 64 and max(sizes) <= 8 and len(sizes) < 32, sizes
    finally:
        assert server.stop(5) == 0


def test_a_lone_client_is_not_kept_waiting():
    server, port = in_process_server(lambda texts: [0.0] * len(texts), max_wait_ms=2000)
    try:
        start = time.monotonic()
        for _ in range(3):
            assert request(port, body={"query": ["x"]})[0] == 200
        assert time.monotonic() - start < 1.5  # not 3 x 2 s: nobody else was arriving
    finally:
        server.stop(5)


def test_only_loopback_hosts_go_without_a_warning():
    assert not any(map(serve.exposure_warning, ["127.0.0.1", "127.0.0.2", "::1", "localhost", "127.1", "127.0.1"]))
    for host in ["0.0.0.0", "::", "192.168.1.2", "example.com", "10.1", "128.1"]:
        assert serve.exposure_warning(host).startswith(f"warning: listening on {host}, beyond this machine, with "
                                                       "no authentication")


def test_startup_mistakes_are_one_line(hf_tiny, model_dir, tmp_path):
    """A plain language model (a random head) is refused as eval.py refuses it, --normalize without saved
    statistics too; a port in use is one line."""
    with pytest.raises(UserError, match="is not a reward model"):
        serve.main([str(hf_tiny[0]), "--port", "0"])
    no_stats = tmp_path / "no-stats"
    shutil.copytree(model_dir, no_stats)
    config = json.loads((no_stats / "config.json").read_text())
    del config["reward_model"]["reward_stats"]
    (no_stats / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="^--normalize needs the reward mean and std in .*save_reward_stats"):
        serve.main([str(no_stats), "--port", "0", "--normalize"])
    # a std with which (r - mean) / std is not finite: refused at load (it answered 500 to every request)
    config["reward_model"]["reward_stats"] = {"mean": 0.0, "std": 5e-324, "n": 10}
    (no_stats / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="reward_stats") as refused:
        serve.main([str(no_stats), "--port", "0", "--normalize"])
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match=r"unrecognized arguments: --bogus \(see python -m tools\.serve --help\)$"):
        serve.main([str(model_dir), "--bogus"])   # (it said "see python python -m tools.serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = subprocess.run([sys.executable, "-m", "tools.serve", str(model_dir), "--port", str(s.getsockname()[1])],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: cannot listen on 127.0.0.1:"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_during_a_batch_never_aborts(model_dir, tmp_path, signals):
    """Long texts at a larger --max_length keep the scoring thread inside forward passes for seconds. One
    signal with a grace shorter than the work (--shutdown_grace 0.2): what waits is dropped (503), exit 0;
    a second signal: exit 130 at once. Neither tears the interpreter down under the running forward pass
    (that was SIGABRT, "terminate called without an active exception")."""
    long_text = "\n\nHuman: tell me about cats." + " whiskers purring fur" * 600 + "\n\nAssistant: kitten"
    body = json.dumps({"query": [long_text + f" {i}" for i in range(MAX_TEXTS)]}).encode()
    log_path = tmp_path / "server.log"
    proc, port = start_server(model_dir, log_path, "--max_length", "500", "--max_body_mb", "1",  # ~0.7 s a batch
                              *["--shutdown_grace", "0.2"] * (signals == 1))
    try:
        with ThreadPoolExecutor(4) as pool:  # 8 batches of 8 texts to score
            answers = [pool.submit(lambda: request(port, body=body)) for _ in range(4)]
            deadline = time.monotonic() + 30
            while request(port, "GET", "/health")[1]["batches"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)   # until the first forward passes run
            for _ in range(signals):
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
            status = proc.wait(timeout=30)
            log = log_path.read_text()
            assert status == (0 if signals == 1 else 130), (status, log)
            assert "terminate called" not in log and "Traceback" not in log, log
            assert ("dropped (503)" if signals == 1 else "stopped at once") in log, log
            for a in answers:  # answered (200 or 503) or cut off: never left hanging
                try:
                    assert a.result(timeout=30)[0] in (200, 503)
                except (ConnectionError, http.client.HTTPException):
                    pass
    finally:
        proc.kill()


def test_json_amplification_is_refused_before_parsing_and_health_does_not_stall():
    """11 million query items in 22 MB (under a 32 MiB --max_body_mb): refused from a count of their commas,
    without json.loads (which took 10 s and 1 GB, holding every thread); four at once, while /health is
    asked every 50 ms and answers in well under a second each time."""
    server, port = in_process_server(lambda texts: [0.0] * len(texts), max_body_mb=32)
    body = b'{"query": [' + b"0," * 11_000_000 + b"0]}"
    latencies, done = [], threading.Event()

    def probe():
        while not done.is_set():
            start = time.monotonic()
            assert request(port, "GET", "/health")[0] == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    try:
        prober = threading.Thread(target=probe)
        prober.start()
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: request(port, body=body), range(4), timeout=60))
        elapsed = time.monotonic() - start
        done.set()
        prober.join(30)
        for status, answer in answers:
            assert status == 400 and "JSON values" in answer["error"], answer
        assert elapsed < 10 and max(latencies) < 1.5, (elapsed, max(latencies))
        assert request(port, body={"query": ["after"]})[0] == 200
    finally:
        done.set()
        server.stop(5)


def trickle(port, prefix: bytes, limit_s: float = 4.0) -> float:
    """Send prefix, then a byte every 0.2 s: seconds until the server closes the connection (limit_s: never)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(prefix)
        start = time.monotonic()
        s.settimeout(0.2)
        while time.monotonic() - start < limit_s:
            try:
                s.sendall(b"a")
                if s.recv(65536) == b"":
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                break
        return time.monotonic() - start


def test_slow_clients_are_cut_off_at_the_request_deadline_and_others_go_on():
    """Slowloris: a byte every 0.2 s keeps a socket timeout from ever firing, in the head or in the body; the
    request deadline (--request_timeout, here 1 s) closes both, while the other clients are served."""
    server, port = in_process_server(lambda texts: [1.0] * len(texts), request_timeout=1.0)
    try:
        for prefix in (b"POST /get_reward HTTP/1.1\r\nX-Slow: ", b"POST /get_reward HTTP/1.1\r\nContent-Length: 100\r\n\r\n"):
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(trickle, port, prefix)
                while not slow.done():
                    assert request(port, body={"query": ["x"]}) == (200, {"rewards": [1.0], "scores": [1.0]})
                    time.sleep(0.1)
                assert slow.result() < 3, slow.result()  # the 1 s deadline; it would have gone on for 4 s
    finally:
        server.stop(5)


def test_connections_are_bounded_and_one_more_is_answered_503_at_once():
    """--max_connections (here 4): four stalled clients hold four threads; a fifth connection is answered 503
    at once (not a fifth thread), and once the four have gone the server serves again."""
    server, port = in_process_server(lambda texts: [1.0] * len(texts), max_connections=4)
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(4)]
    try:
        for s in stalled:
            s.sendall(b"POST /get_reward HTTP/1.1\r\nContent-")
        time.sleep(0.3)
        threads = threading.active_count()
        start = time.monotonic()
        status, answer = request(port, "GET", "/health")
        assert status == 503 and "--max_connections" in answer["error"] and time.monotonic() - start < 2
        assert threading.active_count() <= threads
    finally:
        for s in stalled:
            s.close()
    try:
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert request(port, body={"query": ["x"]}) == (200, {"rewards": [1.0], "scores": [1.0]})
    finally:
        server.stop(5)


def test_a_client_that_left_is_not_scored_and_keeps_nobody_waiting():
    """Three clients send 48 texts each and leave; the next client's one text is answered at once (it waited
    for all 144 texts: 39-72 s on a real model), and the texts of the clients that left are dropped."""
    sizes = []

    def score(texts):
        sizes.append(len(texts))
        time.sleep(0.02 * len(texts))   # 20 ms a text: all 144 would take 2.9 s
        return [1.0] * len(texts)

    server, port = in_process_server(score, batch_size=4)
    try:
        body = json.dumps({"query": [f"text {i}" for i in range(48)]}).encode()
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
                s.sendall(post_bytes(body))
        time.sleep(0.1)
        start = time.monotonic()
        assert request(port, body={"query": ["x"]}) == (200, {"rewards": [1.0], "scores": [1.0]})
        assert time.monotonic() - start < 1.0
        health = request(port, "GET", "/health")[1]
        assert health["dropped"] == 3 and sum(sizes) <= 1 + 3 * 4, (health, sizes)
    finally:
        server.stop(5)


def test_stop_answers_what_still_waits_after_the_grace_with_503():
    """A stop gives the requests in flight their grace, then answers what still waits 503 (the scoring thread
    ends after the piece it is scoring), instead of scoring it all or leaving it unanswered."""
    def score(texts):
        time.sleep(0.1)
        return [1.0] * len(texts)

    server, port = in_process_server(score, batch_size=2)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(request, port, body={"query": ["x"] * 40})   # 20 pieces: 2 s
        time.sleep(0.3)
        start = time.monotonic()
        assert server.stop(grace_s=0.2) == 1
        assert time.monotonic() - start < 3
        status, body = answer.result(timeout=10)
    assert status == 503 and "stopped before scoring" in body["error"], body
    assert not server.batcher.thread.is_alive()


def test_the_json_value_and_body_budgets_are_exact():
    """json_values_at_most counts the commas outside strings: exactly the limit passes, one more does not,
    and commas inside strings (escaped quotes too) never count. The bodies held at once: exactly
    BODY_BUDGET x max_body fits, one byte more waits until some is released."""
    limit = 5
    assert serve.json_values_at_most(b"[" + b"0," * limit + b"0]", limit)
    assert not serve.json_values_at_most(b"[" + b"0," * (limit + 1) + b"0]", limit)
    texty = json.dumps(["a,b,c,\\\",d" * 3, "x,y"] * 3).encode()   # 5 commas between items, dozens inside
    assert texty.count(b",") > 20 and serve.json_values_at_most(texty, limit)
    assert not serve.json_values_at_most(texty, limit - 1)
    server, _ = in_process_server(lambda texts: [0.0] * len(texts))
    try:
        budget = serve.BODY_BUDGET * server.max_body
        assert server.hold(budget) and not server.hold(1)
        assert server.hold(-1) is True and server.hold(1) and not server.hold(1)
        server.hold(-budget)
        assert server.held == 0
    finally:
        server.stop(5)
