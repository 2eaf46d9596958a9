"""Benchmark one reward-model training step: speed, FLOP rate and memory, optionally against transformers.

    python -m tools.bench                                          # CPU-sized default: the "small" config, 4 pairs x 256
    python -m tools.bench --config 0.6b --device cuda --bf16 --compile --compare-hf
    OMP_WAIT_POLICY=PASSIVE python -m tools.bench --suite cpu      # the CPU rows of BENCHMARKS.md (~5 minutes, 2 cores)
    python -m tools.bench --suite gpu --json results.json          # the GPU rows (one H100, ~2 minutes after start-up)
    python -m tools.bench --attention --config 0.6b --bf16 --lengths realistic   # packed attention alone
    python -m tools.bench --best_of_n 4,16                         # score_responses vs N full texts (inference)
    python -m tools.bench --ranked 4 --lengths realistic           # a K=4 group's prompt once vs K-1 / C(K,2) pairs

- One step is train.py's optimizer step less gradient clipping: chosen and rejected in one forward pass,
  rm.pairwise_loss, backward, optimizer step (train.make_optimizer), zero_grad, on random weights with the
  linear head and last pooling: transformers' Qwen3ForSequenceClassification layout, so --compare-hf runs
  the very same weights there (padded as TRL pads), on the same pairs, in the same process.
- Printed per side: tokens/s (real tokens), model TFLOP/s (6 N tokens + 6 layers heads head_dim sum(len^2)),
  MFU (over a measured matmul peak), peak memory (CUDA max allocated; CPU: what the side added to the peak
  RSS), step time (median, min, max, host); with --compare-hf the ratios ours / transformers.
- On a CPU shared with other work set OMP_WAIT_POLICY=PASSIVE: OpenMP's spin-waiting slows small ops
  by orders of magnitude when another process holds a core.
- BENCHMARKS.md ("Method") defines each figure, the --lengths realistic distribution, and what --packing,
  --share_prompt, --compile and --optim_in_backward change.
"""
import argparse
import gc
import json
import math
import shlex
import statistics
import time

import numpy as np
import torch

import data
from support import export, hub, packing, ranked, tokenizer
import qwen3
from support.errors import ArgumentParser, UserError, run_cli
from support.lora import TARGETS, add_lora, check_options
from rm import RewardModel, listwise_loss, pairwise_loss
from support.metrics import peak_memory_gib
from train import TrainConfig, make_optimizer

SUITES = {
    # The GPU table of BENCHMARKS.md, most important rows first: 8 pairs x 512 tokens, bf16 autocast over
    # fp32 master weights (the setup of shared/README.md's baseline).
    "gpu": [
        "--config 0.6b --bf16 --compile --compare-hf",
        "--config 1.7b --bf16 --compile --compare-hf",
        "--config 0.6b --bf16 --compare-hf",
        "--config 1.7b --bf16 --compare-hf",
        "--config 0.6b --bf16 --compile --gradient_checkpointing --8bit_optim",
        "--config 0.6b --bf16 --compile --gradient_checkpointing --8bit_optim --optim_in_backward",
        "--config 1.7b --bf16 --compile --gradient_checkpointing --8bit_optim",
        "--config 1.7b --bf16 --compile --gradient_checkpointing --8bit_optim --optim_in_backward",
        "--config 0.6b --bf16 --lengths realistic --packing --compare-hf",
        "--config 0.6b --bf16 --compile --lengths realistic --packing --compare-hf",
        "--config 0.6b --bf16 --compile --share_prompt --compare-hf",
        "--config 1.7b --bf16 --compile --share_prompt --compare-hf",
        "--config 0.6b --bf16 --compile --share_prompt --packing --compare-hf",
        "--config 0.6b --bf16 --compile --lengths realistic --share_prompt --packing --compare-hf",
        "--config 0.6b --bf16 --compile --lengths realistic --share_prompt --compare-hf",
        "--config 1.7b --bf16 --compile --lengths realistic --share_prompt --packing --compare-hf",
        # All memory options at 16 pairs x 512 (issue 17, goal 3): int8 model, 8-bit Adam, bf16, checkpointing.
        "--config 0.6b --pairs 16 --bf16 --8bit_model --8bit_optim --gradient_checkpointing",
        "--config 1.7b --pairs 16 --bf16 --8bit_model --8bit_optim --gradient_checkpointing",
        "--config 0.6b --pairs 16 --bf16 --8bit_model --8bit_optim --gradient_checkpointing --lora_rank 16",
        "--config 1.7b --pairs 16 --bf16 --8bit_model --8bit_optim --gradient_checkpointing --lora_rank 16",
    ],
    # LoRA (BENCHMARKS.md, "LoRA"): full fine-tuning vs rank-16 adapters vs the QLoRA-style int8 base.
    "lora-gpu": [
        "--config 0.6b --bf16",
        "--config 0.6b --bf16 --lora_rank 16",
        "--config 0.6b --bf16 --8bit_model --lora_rank 16 --8bit_optim --gradient_checkpointing",
        "--config 1.7b --bf16",
        "--config 1.7b --bf16 --lora_rank 16",
        "--config 1.7b --bf16 --8bit_model --lora_rank 16 --8bit_optim --gradient_checkpointing",
    ],
    "lora-cpu": [
        "--config small --pairs 4 --max_length 256 --steps 6",
        "--config small --pairs 4 --max_length 256 --steps 6 --lora_rank 16",
        "--config small --pairs 4 --max_length 256 --steps 6 --bf16 --8bit_model --lora_rank 16 --8bit_optim "
        "--gradient_checkpointing",
    ],
    # The CPU rows: a ~33M-parameter config, 2 cores, eager fp32.
    "cpu": [
        "--config small --pairs 4 --max_length 256 --steps 6 --compare-hf",
        "--config small --pairs 4 --max_length 512 --steps 6 --lengths realistic --packing --compare-hf",
        "--config small --pairs 4 --max_length 256 --steps 6 --share_prompt --compare-hf",
        "--config small --pairs 4 --max_length 512 --steps 6 --lengths realistic --share_prompt --packing --compare-hf",
        "--config small --pairs 4 --max_length 512 --steps 6 --lengths realistic --share_prompt --compare-hf",
    ],
}


# ----------------------------------------------------------------------------------------------
# Inputs


def make_pairs(n_pairs: int, max_length: int, lengths: str, vocab: int, rng: np.random.Generator) -> list:
    """Random token pairs (data.TokenizedPair) with uniform or hh-rlhf-like lengths (see the docstring)."""
    items = []
    for _ in range(n_pairs):
        if lengths == "uniform":
            prompt_len, chosen_len, rejected_len = max_length // 2, max_length, max_length
        else:
            chosen_len = int(np.clip(round(math.exp(rng.normal(math.log(170), 0.8))), 16, max_length))
            prompt_len = max(1, int(rng.uniform(0.3, 0.9) * chosen_len))
            response = max(1, chosen_len - prompt_len) * math.exp(rng.normal(0.0, 0.5))
            rejected_len = int(np.clip(prompt_len + max(1, round(response)), 16, max_length))
        prompt = rng.integers(0, vocab - 1, prompt_len).tolist()
        chosen = prompt + rng.integers(0, vocab - 1, chosen_len - prompt_len).tolist()
        rejected = prompt + rng.integers(0, vocab - 1, rejected_len - prompt_len).tolist()
        items.append(data.TokenizedPair(chosen, rejected, None, "bench", prompt_len,
                                        chosen_len - prompt_len, rejected_len - prompt_len))
    return items


def sequence_lengths(items) -> list:
    return [len(it.chosen_ids) for it in items] + [len(it.rejected_ids) for it in items]


def step_flops(config: qwen3.Qwen3Config, n_params: int, lengths: list) -> float:
    """Model FLOPs of one training step on sequences of these lengths (forward + backward)."""
    per_token_pair = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    attention = per_token_pair * sum(n * n for n in lengths)
    return 6 * n_params * sum(lengths) + attention


# ----------------------------------------------------------------------------------------------
# Measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_PEAK = {}


def peak_flops(device, dtype) -> float:
    """Measured matmul peak in FLOP/s: bf16 8192^3 on CUDA, a 2048^3 product in `dtype` on CPU."""
    key = (device.type, dtype)
    if key not in _PEAK:
        n, reps = (8192, 10) if device.type == "cuda" else (2048, 3)
        dtype = torch.bfloat16 if device.type == "cuda" else dtype
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(2):
            a @ b
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t0)
        _PEAK[key] = 2 * n ** 3 / statistics.median(times)
        del a, b
    return _PEAK[key]


def reset_peak_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # give freed heap memory back to the OS, so the RSS counts what is in use
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def allocated_gib(device):
    """What is still allocated before a side starts (CUDA): should be ~0, else a side leaked memory."""
    gc.collect()
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_steps(step, batches, device, warmup: int, steps: int, host: list | None = None) -> list:
    """Run warmup steps, then `steps` timed steps (cycling through the batches); seconds per step.
    `host` collects the time until the step returns, before the final sync: the CPU's share (when it is
    close to the step time, the GPU waits for Python)."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        t1 = time.perf_counter()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if host is not None:
                host.append(t1 - t0)
    return times


def profile_step(step, batch, device, rows: int = 18):
    """The GPU (or CPU) time of one step by kernel, biggest first: where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(batch)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


# ----------------------------------------------------------------------------------------------
# The two sides


def train_config(args):
    return TrainConfig(learning_rate=1e-5, weight_decay=0.0, optim_8bit=args.optim_8bit)


def build_ours(args, device) -> RewardModel:
    """Our reward model with seeded random weights (made on the device: fast even for 1.7B)."""
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = RewardModel(qwen3.Qwen3Config.from_name(args.config), head="linear", pooling="last")
    model.model.init_weights()
    torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


def make_step(forward, optimizer, autocast, in_backward: bool = False):
    """One training step: forward (returns the loss), backward, optimizer step, zero_grad
    (with in_backward, the optimizer already stepped inside backward)."""
    def step(batch):
        with autocast:
            loss = forward(batch)
        loss.backward()
        if not in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def optimizer_in_backward(model, make_optimizer):
    """One optimizer per parameter, stepped by a hook the moment that parameter's gradient is complete;
    the gradient is freed right after. Returns the hook handles: remove them when done (a hook holds
    the optimizers, which hold the parameters: a cycle through C++ that the garbage collector misses)."""
    optimizers = {p: make_optimizer(p) for p in model.parameters() if p.requires_grad}

    def hook(param):
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)
    return [p.register_post_accumulate_grad_hook(hook) for p in optimizers]


def prepare_ours(args, device, batches_items, pad_id) -> dict:
    """Our model, optimizer, batches and step function, ready to run."""
    model = build_ours(args, device).train()
    if args.model_8bit:  # as train.py builds it: int8 base, then adapters, frozen linears in bf16 under --bf16
        model.quantize_8bit()
    if args.lora_rank:
        add_lora(model, args.lora_rank, base_dtype=torch.bfloat16 if args.bf16 else None)
    model.model.gradient_checkpointing = args.gradient_checkpointing
    if args.compile:
        model.model.compile_blocks()
    cfg = train_config(args)
    handles = []
    if args.optim_in_backward:
        handles = optimizer_in_backward(model, lambda p: make_optimizer(cfg, torch.nn.ParameterList([p]), device))
        optimizer = None
    else:
        optimizer = make_optimizer(cfg, model, device)
    collate = packing.choose_collate(args.packing, args.share_prompt)

    def forward(batch):
        chosen, rejected = model(batch.input_ids, batch.attention_mask, batch.layout).chunk(2)
        return pairwise_loss(chosen, rejected, batch.margin)["loss"]

    def cleanup():
        for handle in handles:
            handle.remove()
    return {"side": "ours", "step": make_step(forward, optimizer, autocast(args, device), args.optim_in_backward),
            "batches": [collate(items, pad_id).to(device) for items in batches_items],
            "n_params": model.model.num_params(), "cleanup": cleanup,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def prepare_hf(args, device, batches_items, pad_id) -> dict:
    """transformers' Qwen3ForSequenceClassification with our initial weights, padded batches (as TRL)."""
    import transformers
    config = qwen3.Qwen3Config.from_name(args.config)
    hf_config = transformers.Qwen3Config(**{**config.to_hf_dict(), "num_labels": 1, "pad_token_id": pad_id,
                                            "use_cache": False})
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = transformers.Qwen3ForSequenceClassification(hf_config)
    ours = build_ours(args, device)
    missing, unexpected = hf.load_state_dict(export.export_state_dict(ours), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing}, unexpected {unexpected}")
    del ours
    hf.train()
    if args.gradient_checkpointing:
        if hasattr(hf, "activation_checkpointing_enable"):  # the newer name (transformers >= 5.2x)
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in hf.model.layers:
            layer.compile()
    optimizer = make_optimizer(train_config(args), hf, device)

    def forward(batch):
        logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rewards = logits.squeeze(-1).float()
        B = rewards.shape[0] // 2
        return pairwise_loss(rewards[:B], rewards[B:])["loss"]
    return {"side": "transformers", "step": make_step(forward, optimizer, autocast(args, device)),
            "batches": [data.collate(items, pad_id).to(device) for items in batches_items],
            "n_params": sum(p.numel() for n, p in hf.named_parameters() if "embed_tokens" not in n),
            "cleanup": lambda: None}


def run_sides(args, device, batches_items, pad_id, prepares: list) -> list:
    """Time each side. CUDA: one side after the other (each alone on the GPU, its own peak memory).
    CPU: all sides built, then their timed steps interleaved, so that a shared machine's load falls on
    both alike; peak memory is then what each side ADDED to the process's peak RSS while it was built
    and warmed up."""
    results = []
    if device.type == "cuda":
        for prepare in prepares:
            before = allocated_gib(device)
            side = prepare(args, device, batches_items, pad_id)
            reset_peak_memory(device)
            host = []
            times = time_steps(side["step"], side["batches"], device, args.warmup, args.steps, host)
            results.append(summarise(side, args, device, times, host, batches_items))
            results[-1]["allocated_before_gib"] = before
            if args.profile and side["side"] == "ours":
                profile_step(side["step"], side["batches"][0], device)
            side["cleanup"]()
            del side
        return results
    # Run each side once on the tiny config first: lazy imports and one-off allocations (transformers
    # imports much of itself on first use) must not count as a side's memory.
    tiny = argparse.Namespace(**{**vars(args), "config": "tiny", "compile": False})
    tiny_items = [make_pairs(2, 16, "uniform", qwen3.SHAPES["tiny"].vocab_size, np.random.default_rng(0))]
    for prepare in prepares:
        side = prepare(tiny, device, tiny_items, qwen3.SHAPES["tiny"].vocab_size - 1)
        side["step"](side["batches"][0])
        side["cleanup"]()
    sides, memory = [], []
    for prepare in prepares:
        reset_peak_memory(device)
        before = peak_memory_gib(device)                    # = the current RSS, just after the reset
        sides.append(prepare(args, device, batches_items, pad_id))
        time_steps(sides[-1]["step"], sides[-1]["batches"], device, args.warmup, 0)
        memory.append(peak_memory_gib(device) - before)
    times, host = [[] for _ in sides], [[] for _ in sides]
    for i in range(args.steps):
        for side, t, h in zip(sides, times, host):
            t += time_steps(side["step"], [side["batches"][(args.warmup + i) % len(side["batches"])]], device, 0, 1, h)
    for side, t, h, mem in zip(sides, times, host, memory):
        results.append({**summarise(side, args, device, t, h, batches_items), "peak_mem_gib": mem})
        if args.profile and side["side"] == "ours":
            profile_step(side["step"], side["batches"][0], device)
        side["cleanup"]()
    return results


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def timed_batches(args, batches_items) -> list:
    """The batches of the timed steps (the steps cycle through the batches): per-step averages are over these."""
    return [batches_items[i % len(batches_items)] for i in range(args.warmup, args.warmup + args.steps)]


def shared_prompt_tokens(items) -> int:
    """Tokens a shared-prompt batch of these pairs puts through the model: each common prefix once."""
    return sum(len(it.chosen_ids) + len(it.rejected_ids) - packing.shared_prefix_len(it.chosen_ids, it.rejected_ids)
               for it in items)


def summarise(side: dict, args, device, times, host, batches_items) -> dict:
    config = qwen3.Qwen3Config.from_name(args.config)
    timed = timed_batches(args, batches_items)
    tokens = statistics.mean(sum(sequence_lengths(items)) for items in timed)
    flops = statistics.mean(step_flops(config, side["n_params"], sequence_lengths(items)) for items in timed)
    median = statistics.median(times)
    peak = peak_flops(device, torch.bfloat16 if args.bf16 else torch.float32)
    return {"side": side["side"], "tokens_per_s": tokens / median, "tflops": flops / median / 1e12,
            "mfu": flops / median / peak, "peak_mem_gib": peak_memory_gib(device), "step_ms": 1000 * median,
            "step_min_ms": 1000 * min(times), "step_max_ms": 1000 * max(times), "tokens_per_step": tokens,
            "peak_tflops": peak / 1e12, "host_ms": 1000 * statistics.median(host),
            "tokens_computed_per_step": statistics.mean(shared_prompt_tokens(items) for items in timed)
            if side["side"] == "ours" and args.share_prompt else tokens,
            "trainable_params": side.get("trainable_params")}


def line(r: dict, device) -> str:
    mem = "CUDA max allocated" if device.type == "cuda" else "added to the peak RSS"
    return (f"{r['side']:<13} tokens/s {r['tokens_per_s']:>10,.0f} | model TFLOP/s {r['tflops']:7.3g} | "
            f"MFU {100 * r['mfu']:5.1f}% | peak memory {r['peak_mem_gib']:6.2f} GiB ({mem}) | "
            f"step time {r['step_ms']:8.1f} ms median [min {r['step_min_ms']:.1f}, max {r['step_max_ms']:.1f}] "
            f"(host {r.get('host_ms', 0):.1f} ms)"
            + (f" | {r['trainable_params'] / 1e6:,.2f}M trainable" if r.get("trainable_params") else ""))


def ratio_line(ours: dict, theirs: dict) -> str:
    q = {k: ours[k] / theirs[k] for k in ("tokens_per_s", "tflops", "mfu", "peak_mem_gib", "step_ms")}
    return (f"{'ours/transformers':<13} tokens/s {q['tokens_per_s']:.2f}x | model TFLOP/s {q['tflops']:.2f}x | "
            f"MFU {q['mfu']:.2f}x | peak memory {q['peak_mem_gib']:.2f}x | step time {q['step_ms']:.2f}x")


# ----------------------------------------------------------------------------------------------
# Packed attention alone: which implementation to use (python -m tools.bench --attention)


def bench_attention(args, device):
    """Forward + backward of one attention layer over a batch of --lengths sequences, each way we could
    confine attention to a sequence; prints the median time of each (the numbers behind packing.choose_impl)."""
    import torch.nn.functional as F
    config = qwen3.Qwen3Config.from_name(args.config)
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rng = np.random.default_rng(args.seed)
    lengths = sequence_lengths(make_pairs(args.pairs, args.max_length, args.lengths, config.vocab_size, rng))
    N, T, S = sum(lengths), max(lengths), len(lengths)
    cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)

    def tensors(shape_q, shape_kv):
        return [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in (shape_q, shape_kv, shape_kv)]

    def packed(fn):
        q, k, v = tensors((1, N, H, D), (1, N, KV, D))
        return lambda: fn(q, k, v).float().sum().backward()

    q, k, v = tensors((S, T, H, D), (S, T, KV, D))
    ways = {"padded (SDPA is_causal, 2B x T)": lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=True).float().sum().backward(),
            "loop": packed(lambda q, k, v: packing.looped_attention(q[0], k[0], v[0], lengths))}
    mask = packing.packed_attention_mask(positions)
    ways["mask (dense block-diagonal, one row)"] = packed(lambda q, k, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True))
    if device.type == "cuda" and dtype != torch.float32 and packing.varlen_kernel()[0] is not None:
        ways["varlen (flash, torch.nn.attention.varlen)"] = packed(
            lambda q, k, v: packing.varlen_attention(q[0], k[0], v[0], cu, T))
    if device.type == "cuda":  # FlexAttention has no CPU backward
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        doc = torch.repeat_interleave(torch.arange(S, device=device), torch.tensor(lengths, device=device))
        block_mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), 1, None, N, N,
                                       device=device)
        flex = torch.compile(flex_attention)
        ways["flex (document block mask, compiled)"] = packed(lambda q, k, v: flex(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=True))
    print(f"== attention forward+backward | {args.config} heads {H}/{KV} x {D} | {S} sequences, {N:,} tokens "
          f"({S * T:,} padded) | {dtype} | {device}", flush=True)
    results = {}
    for name, fn in ways.items():
        try:
            times = time_steps(lambda _: fn(), [None], device, 2, args.steps)
            results[name] = 1000 * statistics.median(times)
            print(f"{name:<44} {results[name]:9.2f} ms", flush=True)
        except Exception as e:
            print(f"{name:<44} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return results


def bench_best_of_n(args, device) -> dict:
    """Inference: N responses to one prompt scored as N full texts in one padded batch (what score() runs)
    against the prompt run once (packing.collate_responses, what score_responses runs). Random weights and
    ids; the prompt has --prompt_length tokens, each response --response_length +-20%. Prints the median
    forward time of each and the speed-up, and checks that both give the same rewards."""
    config = qwen3.Qwen3Config.from_name(args.config)
    torch.manual_seed(args.seed)
    model = RewardModel(config, head="linear", pooling="last")
    model.model.init_weights(seed=args.seed)
    model = model.init_head(args.seed).to(device).eval()
    rng = np.random.default_rng(args.seed)
    pad_id = config.vocab_size - 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = {}
    for n in [int(x) for x in args.best_of_n.split(",")]:
        prompt = rng.integers(0, pad_id, args.prompt_length).tolist()
        seqs = [prompt + rng.integers(0, pad_id, int(args.response_length * rng.uniform(0.8, 1.2))).tolist()
                for _ in range(n)]
        full_ids, mask = tokenizer.pad_rows(seqs, pad_id)
        shared_ids, layout = packing.collate_responses(seqs, pad_id)
        ways = {"full texts": lambda: model(full_ids.to(device), mask.to(device)),
                "prompt once": lambda: model(shared_ids.to(device), layout=layout.to(device))}
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            rewards = {k: f().float() for k, f in ways.items()}
            ms = {k: 1000 * statistics.median(time_steps(lambda _: f(), [None], device, args.warmup, args.steps))
                  for k, f in ways.items()}
        diff = (rewards["full texts"] - rewards["prompt once"]).abs().max().item()
        results[n] = {**ms, "speedup": ms["full texts"] / ms["prompt once"], "max_abs_diff": diff,
                      "tokens": [int(mask.sum()), int(shared_ids.shape[1])]}
        print(f"best-of-{n:<3} {args.config} | prompt {args.prompt_length} + responses ~{args.response_length} tokens "
              f"({results[n]['tokens'][0]:,} -> {results[n]['tokens'][1]:,}) | full texts {ms['full texts']:8.1f} ms | "
              f"prompt once {ms['prompt once']:8.1f} ms | speed-up {results[n]['speedup']:.2f}x | max |diff| "
              f"{diff:.1e} | {name}", flush=True)
    return results


def make_groups(n_groups: int, k: int, max_length: int, lengths: str, vocab: int, rng) -> list:
    """Random ranked groups (ranked.TokenizedGroup, levels K-1..0): one prompt and K responses, each response's
    length drawn as make_pairs draws the rejected one's (hh-rlhf-like with --lengths realistic)."""
    groups = []
    for _ in range(n_groups):
        pairs = make_pairs(k - 1, max_length, lengths, vocab, rng)  # the first's prompt and chosen, K-1 rejected
        prompt = pairs[0].chosen_ids[:pairs[0].prompt_len]
        tails = [pairs[0].chosen_ids[pairs[0].prompt_len:]] + [p.rejected_ids[p.prompt_len:] for p in pairs]
        ids = [(prompt + tail)[:max_length] for tail in tails]
        groups.append(ranked.TokenizedGroup(ids, [float(k - 1 - i) for i in range(k)], "bench", len(prompt),
                                            [len(i) - len(prompt) for i in ids]))
    return groups


def bench_ranked(args, device) -> dict:
    """Training on ranked data: B = --pairs groups of K = --ranked responses per step, as one group batch with
    each prompt run once (ranked.collate_groups, share_prompt; rm.listwise_loss), against the same comparisons
    as K-1 pairs (the best against each other) or all C(K,2) pairs, each pair's sequences whole (padded
    rows; --share_prompt: each pair's prompt once). Real tokens through the model per group, step time
    (forward, backward, AdamW), groups/s."""
    config, k = qwen3.Qwen3Config.from_name(args.config), args.ranked
    pad_id, rng = config.vocab_size - 1, np.random.default_rng(args.seed)
    groups = [make_groups(args.pairs, k, args.max_length, args.lengths, config.vocab_size, rng) for _ in range(args.batches)]
    as_pairs = {f"{k - 1} pairs (best vs each)": [(0, j) for j in range(1, k)],
                f"{k * (k - 1) // 2} pairs (all)": [(i, j) for i in range(k) for j in range(i + 1, k)]}
    pair_collate, results = packing.choose_collate(args.packing, args.share_prompt), {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    for way in ["group, prompt once", *as_pairs]:
        model = build_ours(args, device).train()
        optimizer = make_optimizer(train_config(args), model, device)
        if way in as_pairs:
            batches = [pair_collate([data.TokenizedPair(g.ids[i], g.ids[j], None, "bench", g.prompt_len,
                                                        g.response_lens[i], g.response_lens[j])
                                     for g in gs for i, j in as_pairs[way]], pad_id) for gs in groups]
            forward = lambda b: pairwise_loss(*model(b.input_ids, b.attention_mask, b.layout).chunk(2))["loss"]  # noqa: E731
        else:
            batches = [ranked.collate_groups(gs, pad_id, packed=args.packing, share_prompt=True) for gs in groups]
            forward = lambda b: listwise_loss(model(b.input_ids, b.attention_mask, b.layout), b.group, b.level,  # noqa: E731
                                              b.num_groups)["loss"]
        # real tokens through the model: a group's prompt once; a pair's twice, or once with --share_prompt
        real = statistics.mean(sum(g.prompt_len + sum(g.response_lens) if way not in as_pairs else
                                   sum(len(g.ids[i]) + len(g.ids[j]) - args.share_prompt * g.prompt_len
                                       for i, j in as_pairs[way]) for g in gs) for gs in groups)
        batches = [b.to(device) for b in batches]
        times = time_steps(make_step(forward, optimizer, autocast(args, device)), batches, device, args.warmup, args.steps)
        ms = 1000 * statistics.median(times)
        results[way] = {"tokens_per_group": real / args.pairs, "ms": ms, "groups_per_s": args.pairs / ms * 1000}
        print(f"{way:<24} {results[way]['tokens_per_group']:8,.0f} tokens/group | step {ms:9.1f} ms | "
              f"{results[way]['groups_per_s']:7.2f} groups/s | {args.config}, {args.pairs} groups of K={k}, "
              f"{args.lengths} lengths | {name}", flush=True)
        del model, optimizer
        gc.collect()
    return results


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m tools.bench", description="Benchmark a reward-model training step (see the module "
                       "docstring).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="small", help=f"model config, one of {sorted(qwen3.SHAPES)}")
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default: 8 on CUDA, 4 on CPU)")
    p.add_argument("--max_length", type=int, default=None,
                   help="tokens per sequence (default: 512 on CUDA, 256 on CPU)")
    p.add_argument("--lengths", default="uniform", choices=["uniform", "realistic"],
                   help="uniform: every sequence max_length; realistic: hh-rlhf-like, "
                        "LogNormal(ln 170, 0.8) clipped to [16, max_length] (details in the docstring)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches the steps cycle through")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 4 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 master weights")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--8bit_optim", dest="optim_8bit", action="store_true", help="bitsandbytes AdamW8bit")
    p.add_argument("--packing", action="store_true", help="our side padding-free (packing.collate_packed)")
    p.add_argument("--share_prompt", action="store_true",
                   help="our side computes each pair's prompt once (and no padding; attention on padded rows, "
                        "or with --packing on packed ones)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (both sides)")
    p.add_argument("--optim_in_backward", action="store_true",
                   help="ours: step each parameter as soon as its gradient is ready, then free it")
    p.add_argument("--lora_rank", type=int, default=None, help="ours: train rank-R LoRA adapters and the head only")
    p.add_argument("--8bit_model", dest="model_8bit", action="store_true",
                   help="ours: frozen int8 backbone linears (bitsandbytes Linear8bitLt)")
    p.add_argument("--compare-hf", "--compare_hf", dest="compare_hf", action="store_true",
                   help="also run transformers' Qwen3ForSequenceClassification with the same weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", choices=sorted(SUITES), help="run a whole table of rows (other flags are ignored, "
                                                          "except --device, --json, --warmup and --steps)")
    p.add_argument("--profile", action="store_true", help="after timing, print our step's time by kernel")
    p.add_argument("--rows", help="with --suite: only these rows (1-based, comma separated)")
    p.add_argument("--attention", action="store_true",
                   help="time the packed-attention implementations alone (one layer, forward + backward)")
    p.add_argument("--best_of_n", metavar="N,N", help="time score_responses (the prompt run once) against N full "
                   "texts at these N, inference only (e.g. 4,16)")
    p.add_argument("--ranked", type=int, metavar="K", default=None,
                   help="time training on --pairs groups of K ranked responses, each prompt once, against the same "
                        "comparisons as K-1 or C(K,2) pairs (real tokens per group, step time, groups/s)")
    p.add_argument("--prompt_length", type=int, default=300, help="with --best_of_n: prompt tokens (default 300)")
    p.add_argument("--response_length", type=int, default=100,
                   help="with --best_of_n: tokens per response, +-20%% (default 100)")
    p.add_argument("--json", help="append the results (one JSON object per row) to this file")
    return p.parse_args(argv)


COUNTS = ("pairs", "max_length", "batches", "steps", "ranked", "lora_rank", "prompt_length", "response_length")


def check_counts(args):
    """A count given as 0 or less is refused: 0 does not mean "the default" (--steps 0 ran the default 10)."""
    for name in COUNTS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer (got {getattr(args, name)}); leave it out for "
                            "the default")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more (got {args.warmup})")


def bench(args) -> dict:
    check_counts(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if args.config not in qwen3.SHAPES:
        raise UserError(f"unknown --config {args.config!r}; choose one of {sorted(qwen3.SHAPES)}")
    if args.optim_8bit or args.model_8bit:
        hub.import_bitsandbytes()  # quietly, and without the Hub
    if args.compare_hf and (args.lora_rank or args.model_8bit):
        raise UserError("--compare-hf runs transformers without adapters or int8 weights; drop it with "
                        "--lora_rank/--8bit_model")
    if args.lora_rank is not None:
        check_options(args.lora_rank, None, 0.0, TARGETS)
    cuda = device.type == "cuda"
    args.pairs = args.pairs if args.pairs is not None else (8 if cuda else 4)
    args.max_length = args.max_length if args.max_length is not None else (512 if cuda else 256)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.steps = args.steps if args.steps is not None else (10 if cuda else 4)
    if args.max_length < 16:
        raise UserError("--max_length must be at least 16")
    if args.attention:
        return bench_attention(args, device)
    if args.best_of_n:
        return bench_best_of_n(args, device)
    if args.ranked is not None:
        if args.ranked < 2:
            raise UserError("--ranked K needs K >= 2 responses per group")
        return bench_ranked(args, device)
    if args.compile:  # each config, and ours vs transformers, is its own compiled graph
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    config = qwen3.Qwen3Config.from_name(args.config)
    pad_id = config.vocab_size - 1
    rng = np.random.default_rng(args.seed)
    batches_items = [make_pairs(args.pairs, args.max_length, args.lengths, config.vocab_size, rng)
                     for _ in range(args.batches)]
    opts = [o for o in ("bf16", "gradient_checkpointing", "optim_8bit", "packing", "share_prompt", "compile",
                        "optim_in_backward", "model_8bit", "lora_rank") if getattr(args, o)]
    timed = timed_batches(args, batches_items)
    real = statistics.mean(sum(sequence_lengths(b)) for b in timed)
    padded = statistics.mean(2 * args.pairs * max(sequence_lengths(b)) for b in timed)
    shared = ""
    if args.share_prompt:
        shared = f", {statistics.mean(shared_prompt_tokens(b) for b in timed):,.0f} with shared prompts"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"== {args.config} | {args.pairs} pairs x {args.max_length} ({args.lengths}: {real:,.0f} real tokens of "
          f"{padded:,.0f} padded per timed step on average{shared}) | {', '.join(opts) or 'fp32 eager'} | {name} | "
          f"torch {torch.__version__}", flush=True)
    row = {"command": "python -m tools.bench " + command_line(args), "device": name, "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__}
    prepares = [prepare_ours]
    if args.compare_hf:  # transformers first: anything a side leaves behind can only count against ours
        import transformers
        row["transformers_version"] = transformers.__version__
        prepares = [prepare_hf, prepare_ours]
    for result in run_sides(args, device, batches_items, pad_id, prepares):
        row[result["side"]] = result
    for side in ("transformers", "ours"):
        if side in row:
            print(line(row[side], device), flush=True)
    if args.compare_hf:
        print(ratio_line(row["ours"], row["transformers"]), flush=True)
    print(f"(peak matmul measured: {row['ours']['peak_tflops']:.1f} TFLOP/s)", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def command_line(args) -> str:
    flags = [f"--config {args.config}", f"--pairs {args.pairs}", f"--max_length {args.max_length}",
             f"--warmup {args.warmup}", f"--steps {args.steps}", f"--batches {args.batches}", f"--seed {args.seed}"]
    if args.lengths != "uniform":
        flags.append(f"--lengths {args.lengths}")
    if args.lora_rank:
        flags.append(f"--lora_rank {args.lora_rank}")
    for flag, on in (("--bf16", args.bf16), ("--gradient_checkpointing", args.gradient_checkpointing),
                     ("--8bit_optim", args.optim_8bit), ("--packing", args.packing),
                     ("--share_prompt", args.share_prompt), ("--compile", args.compile),
                     ("--optim_in_backward", args.optim_in_backward), ("--8bit_model", args.model_8bit),
                     ("--compare-hf", args.compare_hf)):
        if on:
            flags.append(flag)
    return " ".join(flags)


def main(argv=None):
    args = parse_args(argv)
    if not args.suite:
        return bench(args)
    check_counts(args)  # --warmup and --steps apply to every row: refused once, not row by row
    rows, failed = [], []
    specs = SUITES[args.suite]
    if args.rows:
        specs = [specs[int(i) - 1] for i in args.rows.split(",")]
    for spec in specs:
        row_args = parse_args(shlex.split(spec))
        for name in ("device", "json", "warmup", "steps"):
            if getattr(args, name) is not None:
                setattr(row_args, name, getattr(args, name))
        try:
            rows.append(bench(row_args))
        except Exception as e:  # one broken row (out of memory, a missing kernel) must not end the suite
            print(f"!! {spec}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
            failed.append(spec)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"\nsuite {args.suite}: {len(rows)} rows done" + (f", {len(failed)} failed: {failed}" if failed else ""))
    return rows


if __name__ == "__main__":
    run_cli(main)
