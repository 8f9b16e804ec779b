#!/usr/bin/env python3
"""Training-step benchmark, side by side in one run: our trainer (compiler/examples/step_time.rs)
and PyTorch + transformers doing the same step on the same model and shapes.

One step = forward of a batch after a trainable KV cartridge of p slots (the first frozen), the
distillation loss against a top-20 at every token, backward to the cartridge, Adam. SmolLM2-135M
(the GGUF dequantised to f32), 2 threads, batch 4 x 256 tokens, p = 256 and 1024; each side runs
in its own process per shape so peak memory (max RSS, model included) is comparable.

Usage (from the repository root, after scripts/fetch-model.sh):

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers gguf accelerate
    /tmp/torchenv/bin/python scripts/bench_train.py [--steps 4] [--out bench-train.md]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench_common import load_pytorch_model, write_report

SHAPES = [(256, 4, 256), (1024, 4, 256)]
TOP_K = 20


def ours(p, b, t, steps):
    out = subprocess.run(
        ["cargo", "run", "-q", "--release", "-p", "cartridge-compiler", "--example", "step_time",
         "--", str(p), str(b), str(t), str(steps)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def pytorch_child(p, b, t, steps):
    """Runs in a child process: prints one JSON line."""
    from transformers import DynamicCache

    torch, m = load_pytorch_model()
    for w in m.parameters():
        w.requires_grad_(False)
    cfg = m.config
    vocab = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        init = m(torch.randint(0, vocab, (1, p), generator=g), use_cache=True).past_key_values
    frozen, trainable = [], []
    for layer in init.layers:
        k, v = layer.keys, layer.values  # [1, kv_heads, p, head_dim], post-RoPE
        frozen.append((k[:, :, :1].clone(), v[:, :, :1].clone()))
        trainable.append((torch.nn.Parameter(k[:, :, 1:].clone()),
                          torch.nn.Parameter(v[:, :, 1:].clone())))
    opt = torch.optim.Adam([x for kv in trainable for x in kv], lr=2e-2)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    topk = torch.randint(0, vocab, (b, t, TOP_K), generator=g)
    weights = torch.full((b, t, TOP_K), float(torch.tensor(-3.0).exp()))
    positions = torch.arange(p, p + t).expand(b, t)
    mask = torch.ones(b, p + t, dtype=torch.long)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        cache = DynamicCache(config=cfg)
        for li, ((fk, fv), (k, v)) in enumerate(zip(frozen, trainable)):
            cache.update(torch.cat([fk, k], 2).expand(b, -1, -1, -1),
                         torch.cat([fv, v], 2).expand(b, -1, -1, -1), li)
        logits = m(ids, past_key_values=cache, attention_mask=mask, position_ids=positions,
                   use_cache=False).logits
        picked = torch.log_softmax(logits, -1).gather(-1, topk)
        loss = -(weights * picked).sum() / (b * t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[1:] if len(times) > 1 else times)
    print(json.dumps({
        "p": p, "batch": b, "seq": t, "median_step_s": step, "tokens_per_s": b * t / step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
    }))


def pytorch(p, b, t, steps):
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--torch-child", f"{p},{b},{t},{steps}"],
            check=True, capture_output=True, text=True,
        ).stdout
    except subprocess.CalledProcessError as e:
        print(f"PyTorch side failed: {e.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per shape (the first is not counted)")
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        pytorch_child(*map(int, args.torch_child.split(",")), )
        return
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("PyTorch not installed: its column stays empty", file=sys.stderr)
    lines = [
        f"Machine: {os.cpu_count()} threads. One step = forward + backward + Adam of the cartridge, "
        f"median of {args.steps - 1} steps after a warm-up step; peak = max RSS of the process "
        "(model weights included).",
        "",
        "| shape | ours step (s) | ours tok/s | PyTorch step (s) | PyTorch tok/s | ours / PyTorch | ours peak (MiB) | PyTorch peak (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, b, t in SHAPES:
        o = ours(p, b, t, args.steps)
        q = pytorch(p, b, t, args.steps) if have_torch else None
        qs = (f"{q['median_step_s']:.2f} | {q['tokens_per_s']:.0f} | {o['tokens_per_s'] / q['tokens_per_s']:.2f}x"
              if q else "- | - | -")
        lines.append(
            f"| p={p}, {b}x{t} | {o['median_step_s']:.2f} | {o['tokens_per_s']:.0f} | {qs} | "
            f"{o['peak_rss_mb']:.0f} | {q['peak_rss_mb']:.0f} |" if q else
            f"| p={p}, {b}x{t} | {o['median_step_s']:.2f} | {o['tokens_per_s']:.0f} | {qs} | "
            f"{o['peak_rss_mb']:.0f} | - |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines)
    write_report(text, args.out)


if __name__ == "__main__":
    main()
