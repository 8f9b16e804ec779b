#!/usr/bin/env python3
"""GPU benchmark, PyTorch + transformers side: the same measurements, with the same shapes, as our
Rust side (examples/examples/device_bench.rs), one JSON line per result on stdout.

What is measured:
  matmul     n x n x n product in the compute dtype (TFLOP/s)
  bandwidth  device-to-device copy into a preallocated buffer (GB/s, read + write counted)
  train      one cartridge step per model and prefix size p: forward of a batch after a KV prefix
             of p slots (slot 0 frozen, the rest f32 master weights cast to the compute dtype),
             the top-20 distillation loss, backward to the prefix, Adam
  decode     greedy decoding with a KV cache after a shared prefix ("cartridge": 512 slots,
             "icl": 4096 tokens), each sequence with its own 8-token prompt, 64 new tokens
  synth      self-study's answer role: 64 sequences after one shared 1024-token chunk, 128 new
             tokens each, greedy, the top-20 log-probabilities kept at every token

Models are built from their configs with random weights (no downloads: the GPU machine has no
internet); speed does not depend on the weights' values.

Usage (from the repository root):

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers
    /tmp/torchenv/bin/python scripts/bench_gpu.py [--device cuda|cpu] [--scale full|smoke] \\
        [--models smollm2-135m,llama-1b] [--dtype bf16|f32] [--out FILE.jsonl]

`--device cpu --scale smoke` runs tiny shapes on a tiny model, to test the script without a GPU.
Progress and a markdown summary go to stderr.
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

TOP_K = 20
PROMPT_LEN = 8

# Shapes common to the Rust side; "smoke" shrinks everything so a CPU run takes seconds.
SCALES = {
    "full": dict(matmul_n=8192, copy_bytes=1 << 30, train_p=(512, 2048), train_batch=16,
                 train_seq=1024, train_warmup=2, train_steps=5,
                 decode_prefix=(("cartridge", 512), ("icl", 4096)), decode_batch=(1, 32, 128),
                 new_tokens=64, synth=(1024, 64, 128)),
    "smoke": dict(matmul_n=256, copy_bytes=16 << 20, train_p=(16, 64), train_batch=2,
                  train_seq=32, train_warmup=1, train_steps=2,
                  decode_prefix=(("cartridge", 16), ("icl", 128)), decode_batch=(1, 4, 8),
                  new_tokens=8, synth=(64, 8, 8)),
}

MODELS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, rope_theta=100000.0),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                 max_position_embeddings=1024),
}

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sync(dev):
    """Wait for the device's queued work, so the clock reads finished work."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev):
    if dev.type == "cuda":
        return f"cuda:{dev.index or 0} ({torch.cuda.get_device_name(dev)})"
    return "cpu"


def is_oom(e):
    # torch.OutOfMemoryError is a RuntimeError subclass; older builds only say so in the message.
    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e)


def free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def build_model(name, dev, dtype):
    """LlamaForCausalLM with random weights (normal, std 0.02; RMSNorm weights one), built on the
    device itself so a 1B model never passes through host memory, frozen."""
    # rope_theta: transformers 4.x keeps it as is, 5.x turns it into rope_parameters (default rope).
    cfg = LlamaConfig(**{"max_position_embeddings": 8192, **MODELS[name]}, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, initializer_range=0.02,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(dev):
        m = LlamaForCausalLM(cfg)
    m = m.to(dtype).eval()
    # Our own init rather than relying on transformers' (its defaults and laziness vary by version).
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                mod.weight.normal_(0.0, 0.02)
            elif "RMSNorm" in type(mod).__name__:
                mod.weight.fill_(1.0)
    for w in m.parameters():
        w.requires_grad_(False)
    return m


def cache_layers(cache):
    """[(keys, values)] per layer, each [batch, kv_heads, slots, head_dim], of a DynamicCache."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def new_cache(cfg):
    try:
        return DynamicCache(config=cfg)
    except TypeError:  # transformers < 4.56 takes no config
        return DynamicCache()


def seeded_cache(cfg, kv, batch):
    """A DynamicCache holding the prefix `kv` ([1, ...] per layer) for every sequence of the batch
    as expanded views. DynamicCache.update would copy them (it concatenates onto an empty tensor),
    so where the cache has per-layer objects (transformers >= 4.56) the views are set directly:
    the one batch-sized copy is then the cache's own torch.cat in the first forward, which any
    transformers run pays."""
    cache = new_cache(cfg)
    layers = getattr(cache, "layers", None)
    for li, (k, v) in enumerate(kv):
        k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        layer = layers[li] if layers is not None and li < len(layers) else None
        if layer is not None and hasattr(layer, "lazy_initialization"):
            try:
                layer.lazy_initialization(k, v)
            except TypeError:  # some 4.5x releases take the keys only
                layer.lazy_initialization(k)
            layer.keys, layer.values = k, v
        else:
            cache.update(k, v, li)
    if cache.get_seq_length() != kv[0][0].shape[-2]:  # internals not as expected: the public way
        cache = new_cache(cfg)
        for li, (k, v) in enumerate(kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), li)
    return cache


@torch.no_grad()
def prefix_kv(m, n, dev, seed):
    """KV ([1, kv_heads, n, head_dim] per layer, post-RoPE) of n random tokens at positions 0..n-1."""
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (1, n), generator=g, device=dev)
    out = m(ids, use_cache=True, past_key_values=new_cache(m.config))
    return [(k.detach(), v.detach()) for k, v in cache_layers(out.past_key_values)]


def bench_matmul(dev, dtype, n):
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=dev).to(dtype)
    b = torch.randn(n, n, generator=g, device=dev).to(dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    sync(dev)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=c)
    sync(dev)
    s = (time.perf_counter() - t0) / reps
    return {"n": n, "seconds": s, "tflops": 2 * n**3 / s / 1e12}


def bench_bandwidth(dev, nbytes):
    src = torch.full((nbytes,), 1, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(dev)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(dev)
    s = (time.perf_counter() - t0) / reps
    moved = 2 * nbytes  # each byte read once and written once
    return {"bytes": moved, "seconds": s, "gb_per_s": moved / s / 1e9}


def bench_train(m, dev, dtype, p, b, t, warmup, steps):
    cfg = m.config
    vocab = cfg.vocab_size
    init = prefix_kv(m, p, dev, seed=1)
    # Slot 0 stays frozen (the attention sink); the rest are f32 master weights for Adam.
    frozen = [(k[:, :, :1], v[:, :, :1]) for k, v in init]
    trainable = [(torch.nn.Parameter(k[:, :, 1:].float().clone()),
                  torch.nn.Parameter(v[:, :, 1:].float().clone())) for k, v in init]
    del init
    opt = torch.optim.Adam([x for kv in trainable for x in kv], lr=2e-2)
    g = torch.Generator(device=dev).manual_seed(2)
    ids = torch.randint(0, vocab, (b, t), generator=g, device=dev)
    topk = torch.randint(0, vocab, (b, t, TOP_K), generator=g, device=dev)
    weights = torch.full((b, t, TOP_K), math.exp(-3.0), device=dev)
    positions = torch.arange(p, p + t, device=dev).expand(b, t)
    times, loss = [], None
    for i in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        # bf16 compute from f32 master weights: the cast is part of the step, as in ours.
        kv = [(torch.cat([fk, k.to(dtype)], 2), torch.cat([fv, v.to(dtype)], 2))
              for (fk, fv), (k, v) in zip(frozen, trainable)]
        cache = seeded_cache(cfg, kv, b)
        # No attention_mask: no padding, and the causal mask (offset by the cache length p) is
        # built from the cache either way.
        logits = m(ids, past_key_values=cache, position_ids=positions, use_cache=False).logits
        picked = torch.log_softmax(logits.float(), -1).gather(-1, topk)
        loss = -(weights * picked).sum() / (b * t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.item()
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del kv, cache, logits, picked
    s = statistics.median(times)
    return {"step_s": s, "tokens_per_s": b * t / s, "loss": loss}


@torch.inference_mode()
def decode_once(m, kv, prompts, new_tokens, top_k=0):
    """Greedy decoding of `new_tokens` tokens per sequence after the shared prefix `kv`: the prompt
    prefill gives the first token, then one forward per further token (no early stop). With top_k,
    the top-k log-probabilities (f32) of every step are kept too. (seconds, tokens [b, new])."""
    b = prompts.shape[0]
    cache = seeded_cache(m.config, kv, b)
    dev = prompts.device
    kept = []

    def pick(logits):
        if top_k:
            kept.append(torch.log_softmax(logits.float(), -1).topk(top_k, -1))
        return logits.argmax(-1, keepdim=True)

    sync(dev)
    t0 = time.perf_counter()
    # logits_to_keep=1: only the last position's logits are needed, as model.generate does.
    out = m(prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = pick(out.logits[:, -1])
    generated = [tok]
    for _ in range(new_tokens - 1):
        out = m(tok, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        tok = pick(out.logits[:, -1])
        generated.append(tok)
    sync(dev)
    s = time.perf_counter() - t0
    return s, torch.cat(generated, 1)


def bench_decode(m, dev, kv, b, new_tokens, top_k=0):
    g = torch.Generator(device=dev).manual_seed(3)
    prompts = torch.randint(0, m.config.vocab_size, (b, PROMPT_LEN), generator=g, device=dev)
    decode_once(m, kv, prompts, new_tokens, top_k)  # warm-up
    runs = [decode_once(m, kv, prompts, new_tokens, top_k)[0] for _ in range(3)]
    s = sum(runs) / len(runs)
    return {"seconds": s, "tokens_per_s": b * new_tokens / s}


def guarded(dev, fn):
    """fn()'s fields, or {"error": "out of memory"} (the memory freed) when the shape does not fit."""
    try:
        return fn()
    except RuntimeError as e:
        if not is_oom(e):
            raise
        msg = "out of memory"
    # Outside the except block, so the traceback's frames (and their tensors) are gone.
    free(dev)
    return {"error": msg}


def emit(row, rows, out):
    rows.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def fmt_row(r):
    """(bench, shape, time, throughput) of a result row, for the summary table."""
    if r["bench"] == "matmul":
        return "matmul", f"n={r['n']}", f"{r['seconds'] * 1e3:.3f} ms", f"{r['tflops']:.3g} TFLOP/s"
    if r["bench"] == "bandwidth":
        return ("bandwidth", f"{r['bytes'] / 2**20:.0f} MiB moved", f"{r['seconds'] * 1e3:.3f} ms",
                f"{r['gb_per_s']:.0f} GB/s")
    if r["bench"] == "train":
        shape = f"{r['model']} p={r['p']} {r['batch']}x{r['seq']}"
        if "error" in r:
            return "train", shape, r["error"], "-"
        mem = f", peak {r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] is not None else ""
        return ("train", shape, f"{r['step_s']:.3f} s/step",
                f"{r['tokens_per_s']:.0f} tok/s (loss {r['loss']:.3f}{mem})")
    if r["bench"] == "synth":
        shape = f"{r['model']} chunk {r['chunk_tokens']} b={r['batch']} x {r['new_tokens']}"
    else:
        shape = f"{r['model']} {r['prefix']} {r['prefix_tokens']} b={r['batch']}"
    if "error" in r:
        return r["bench"], shape, r["error"], "-"
    return r["bench"], shape, f"{r['seconds']:.3f} s", f"{r['tokens_per_s']:.0f} tok/s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=list(SCALES), default="full")
    ap.add_argument("--models", default="smollm2-135m,llama-1b",
                    help="comma-separated; ignored by --scale smoke, which uses a tiny model")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, f32 on cpu")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: --device cuda asked, but torch sees no GPU")
    dev = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    dtype_name = args.dtype or ("bf16" if dev.type == "cuda" else "f32")
    dtype = DTYPES[dtype_name]
    sc = SCALES[args.scale]
    models = ["tiny"] if args.scale == "smoke" else [x for x in args.models.split(",") if x]
    for name in models:
        if name not in MODELS:
            sys.exit(f"bench_gpu.py: unknown model {name!r} (known: {', '.join(MODELS)})")
    if dev.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    base = {"impl": "pytorch", "device": device_name(dev), "dtype": dtype_name}
    log(f"torch {torch.__version__}, {base['device']}, {dtype_name}, scale {args.scale}")
    rows = []

    log(f"matmul n={sc['matmul_n']}")
    emit({"bench": "matmul", **base, **bench_matmul(dev, dtype, sc["matmul_n"])}, rows, args.out)
    log(f"bandwidth {sc['copy_bytes'] >> 20} MiB")
    emit({"bench": "bandwidth", **base, **bench_bandwidth(dev, sc["copy_bytes"])}, rows, args.out)

    for name in models:
        log(f"building {name}")
        m = build_model(name, dev, dtype)
        b, t = sc["train_batch"], sc["train_seq"]
        for p in sc["train_p"]:
            log(f"train {name} p={p} {b}x{t}")
            free(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            res = guarded(dev, lambda: bench_train(m, dev, dtype, p, b, t, sc["train_warmup"],
                                                   sc["train_steps"]))
            if "error" not in res:
                res["peak_mem_gb"] = (torch.cuda.max_memory_allocated(dev) / 1e9
                                      if dev.type == "cuda" else None)
            emit({"bench": "train", **base, "model": name, "p": p, "batch": b, "seq": t, **res},
                 rows, args.out)
        for kind, n in sc["decode_prefix"]:
            kv = prefix_kv(m, n, dev, seed=4)  # built once per prefix, not timed
            for b in sc["decode_batch"]:
                log(f"decode {name} {kind} {n} batch {b}")
                res = guarded(dev, lambda: bench_decode(m, dev, kv, b, sc["new_tokens"]))
                emit({"bench": "decode", **base, "model": name, "prefix": kind, "prefix_tokens": n,
                      "batch": b, "new_tokens": sc["new_tokens"], **res}, rows, args.out)
            del kv
        chunk, b, n = sc["synth"]
        log(f"synth {name} chunk {chunk} batch {b} x {n} tokens, top-{TOP_K}")
        kv = prefix_kv(m, chunk, dev, seed=5)
        res = guarded(dev, lambda: bench_decode(m, dev, kv, b, n, TOP_K))
        emit({"bench": "synth", **base, "model": name, "chunk_tokens": chunk, "batch": b,
              "new_tokens": n, "top_k": TOP_K, **res}, rows, args.out)
        del kv, m
        free(dev)

    lines = [f"PyTorch {torch.__version__}, {base['device']}, {dtype_name}", "",
             "| bench | shape | time | throughput |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(fmt_row(r)) + " |" for r in rows]
    log("\n".join(lines))


if __name__ == "__main__":
    main()
