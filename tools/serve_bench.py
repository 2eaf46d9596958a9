"""Throughput of the reward server (tools/serve.py) under concurrent clients: does batching pay?

    python -m tools.serve_bench                                 # the demo model's shape, random weights, CPU
    python -m tools.serve_bench --config small --texts 256      # tools/bench.py's CPU shape: 8 layers, hidden 512
    python -m tools.serve_bench out/rm/final_model --device cuda --texts 2048 --clients 1 8 32 128

- The same texts (demo test transcripts, ~40 tokens each) are scored in each row. The baseline is ONE
  client sending them one request per text, one after the other. Then N concurrent clients (threads
  here, each with its own keep-alive connection) share them out, still one text per request, as
  OpenRLHF's client sends them. The last row sends them all in one request: the best batching can do.
- Two servers run side by side: one as it is (--batch_size, --max_wait_ms), one that scores every
  request alone (--batch_size 1), so that what batching buys is told apart from what mere concurrency
  buys. They take turns run by run, so that a change in the machine's load falls on both alike; each
  row is the median of --repeat runs.
- Printed per row: texts/s, the speed-up over the baseline, the median and 95th-percentile latency of a
  request, and whether every reward equals the baseline's (to 1e-4).
- The clients run in this process and share the machine with the servers: on a small CPU they take a
  share of it, so the CPU rows understate the server. The servers run with OMP_WAIT_POLICY=PASSIVE.
- --config small: tools/bench.py's CPU shape (8 layers, hidden 512; 25M parameters with the demo vocabulary).
"""
import json
import http.client
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from support.errors import ArgumentParser, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def demo_model_dir(config_name: str, out_dir: Path) -> Path:
    """A random reward model of a qwen3.SHAPES shape with the demo tokenizer (the demo model's setup)."""
    import dataclasses
    import torch
    from qwen3 import SHAPES
    from rm import RewardModel
    from support.demo import demo_tokenizer
    tok = demo_tokenizer()
    torch.manual_seed(0)
    model = RewardModel(dataclasses.replace(SHAPES[config_name], vocab_size=tok.vocab_size), pooling="last")
    model.model.init_weights(seed=0)
    model.init_head(0)
    model.tokenizer, model.provenance = tok, {"max_length": 128}
    return model.save_pretrained(out_dir / "model")


def start_server(checkpoint: str, serve_args: list[str], log_path: Path):
    """(process, port): `python -m tools.serve` on a free loopback port."""
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "tools.serve", checkpoint, "--port", "0", "--quiet", *serve_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"on http://127\.0\.0\.1:(\d+)/get_reward", log_path.read_text())
        if found:
            return proc, int(found.group(1))
        time.sleep(0.1)
    proc.kill()
    raise UserError(f"the server did not start: {log_path.read_text()[-2000:]}")


def run_clients(port: int, requests: list[list], clients: int) -> tuple[float, list[float], list]:
    """Send `requests` (lists of texts) from `clients` threads, each taking the next one not yet sent.
    -> (seconds, latency of each request, rewards in request order)."""
    results, latencies = [None] * len(requests), [0.0] * len(requests)
    next_index, lock, errors = [0], threading.Lock(), []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(requests):
                    return
                start = time.perf_counter()
                conn.request("POST", "/get_reward", body=json.dumps({"query": requests[i]}),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = json.loads(response.read())
                latencies[i] = time.perf_counter() - start
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}: {answer}")
                results[i] = answer["rewards"]
        except Exception as e:
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise UserError(f"a client failed: {errors[0]}")
    return seconds, latencies, [r for rewards in results for r in rewards]


def bench(servers: dict, texts: list, client_counts: list[int], repeat: int) -> list[dict]:
    """Rows for each server ({name: port}) and setup: one text per request from each client count, then all
    texts in one request. The servers take turns run by run, so that a change in the machine's load
    falls on both alike; each row is the median of `repeat` runs."""
    for port in servers.values():
        run_clients(port, [[t] for t in texts[:16]], 4)  # warm-up
    setups = [(c, 1) for c in client_counts] + [(1, len(texts))]
    runs = {(name, setup): [] for name in servers for setup in setups}
    for setup in setups:
        clients, per_request = setup
        requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
        for _ in range(repeat):
            for name, port in servers.items():
                runs[name, setup].append(run_clients(port, requests, clients))
    rows = []
    for (name, (clients, per_request)), results in runs.items():
        seconds, latencies, rewards = sorted(results, key=lambda run: run[0])[len(results) // 2]
        lat = sorted(latencies)
        rows.append({"server": name, "clients": clients, "texts_per_request": per_request,
                     "texts_per_s": len(texts) / seconds, "p50_ms": 1000 * statistics.median(lat),
                     "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))], "rewards": rewards})
    baseline_speed, baseline_rewards = rows[0]["texts_per_s"], rows[0]["rewards"]  # per request, 1 client, 1 text
    for row in rows:
        row["speedup"] = row["texts_per_s"] / baseline_speed
        row["same_rewards"] = all(abs(a - b) < 1e-4 for a, b in zip(row.pop("rewards"), baseline_rewards))
    return rows


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m tools.serve_bench", description="Throughput of tools/serve.py with "
                       "1..N concurrent clients, batched and unbatched, against one client sending one text "
                       "per request.")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a reward model (default: a random one of --config's shape with the demo tokenizer)")
    p.add_argument("--config", default="tiny", choices=["tiny", "small"],
                   help="shape of the random model without CHECKPOINT (default: tiny, the demo model's)")
    p.add_argument("--texts", type=int, default=256, help="texts scored per row (default: 256)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (default: 1 8 32)")
    p.add_argument("--batch_size", type=int, default=32, help="the server's --batch_size (default: 32)")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="the server's --max_wait_ms (default: 5)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="the server loads the weights in bfloat16")
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the median one is shown (default: 3)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.texts < 16 or any(c < 1 for c in args.clients) or args.batch_size < 1 or args.repeat < 1:
        raise UserError("--texts must be at least 16, --clients, --batch_size and --repeat at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    from support.demo import demo_rows
    texts = [row[k] for row in demo_rows("test") for k in ("chosen", "rejected")][:args.texts]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(demo_model_dir(args.config, Path(tmp)))
        common = ["--device", args.device, "--max_wait_ms", str(args.max_wait_ms)] + ["--bf16"] * args.bf16
        # every client its connection, and the last row's one request of all the texts, within the server's limits
        common += ["--max_connections", str(max(args.clients) + 8), "--max_texts", str(max(1024, args.texts))]
        procs, servers = [], {}
        try:
            for name, batch_size in (("per request", 1), ("batched", args.batch_size)):
                proc, port = start_server(checkpoint, common + ["--batch_size", str(batch_size)],
                                          Path(tmp) / f"log{batch_size}")
                procs.append(proc)
                servers[f"{name} (--batch_size {batch_size})"] = port
            table = bench(servers, texts, args.clients, args.repeat)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"# python -m tools.serve_bench {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {len(texts)} texts, model {args.checkpoint or 'random ' + args.config}, {args.device}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after")
    print("| server | clients | texts/request | texts/s | vs 1 client, 1 text/request | p50 ms | p95 ms | same rewards |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['server']} | {r['clients']} | {r['texts_per_request']} | {r['texts_per_s']:,.0f} | "
              f"{r['speedup']:.2f}x | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {'yes' if r['same_rewards'] else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    run_cli(main)
