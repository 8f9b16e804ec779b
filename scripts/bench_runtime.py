#!/usr/bin/env python3
"""Runtime benchmark, side by side in one run: our runtime (cargo bench), PyTorch + transformers on
the same model and shapes, and the machine's physical limits (measured by the Rust bench).

Usage (from the repository root, after scripts/fetch-model.sh):

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers gguf accelerate
    /tmp/torchenv/bin/python scripts/bench_runtime.py [--out bench-runtime.md]

Without torch the PyTorch column is left empty. Both sides use 2 threads (this machine's cores),
f32, the SmolLM2-135M-Instruct GGUF dequantised to f32, the same token ids and the same shapes.
"""
import argparse
import json
import os
import subprocess
import time

from bench_common import load_pytorch_model, write_report

PROMPT_LEN = 16
STEPS = 16


def tokens(n, seed, vocab=49152):
    return [((i * 7919 + seed * 104729) % (2**32)) % (vocab - 200) + 100 for i in range(n)]


def ours():
    out = subprocess.run(
        ["cargo", "bench", "-q", "-p", "cartridge-runtime", "--bench", "runtime"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out[out.index("{"):])


def pytorch():
    loaded = load_pytorch_model()
    if loaded is None:
        return None
    torch, m = loaded
    res = {"torch": torch.__version__, "prefill": {}, "decode": {}, "ttft": {}}

    def best(reps, f):
        t_best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            f()
            t_best = min(t_best, time.perf_counter() - t)
        return t_best

    with torch.inference_mode():
        for n in (512, 2048):
            ids = torch.tensor([tokens(n, 1)])
            s = best(2, lambda: m(ids, use_cache=True, logits_to_keep=1))
            res["prefill"][n] = n / s

        import copy

        def prefix_cache(n, seed):
            if n == 0:
                return None
            ids = torch.tensor([tokens(n, seed)])
            return m(ids, use_cache=True, logits_to_keep=1).past_key_values

        def replicated(cache, batch):
            # The prefix computed once, then copied per sequence: HF's cache has no shared prefix.
            if cache is None:
                return None
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(batch)
            return c

        for name, n, seed in (("none", 0, 0), ("cartridge_256", 256, 2), ("context_2048", 2048, 3)):
            prefix = prefix_cache(n, seed)
            for b in (1, 8, 32):
                prompt = torch.tensor([tokens(PROMPT_LEN, 10 + i) for i in range(b)])
                t_best = float("inf")
                for _ in range(2):
                    cache = replicated(prefix, b)
                    mask = torch.ones(b, n + PROMPT_LEN, dtype=torch.long)
                    out = m(prompt, past_key_values=cache, attention_mask=mask, use_cache=True, logits_to_keep=1)
                    cache = out.past_key_values
                    t = time.perf_counter()
                    for _ in range(STEPS):
                        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
                        out = m(nxt, past_key_values=cache, attention_mask=mask, use_cache=True, logits_to_keep=1)
                        cache = out.past_key_values
                    t_best = min(t_best, time.perf_counter() - t)
                res["decode"][(name, b)] = b * STEPS / t_best

        q = torch.tensor([tokens(PROMPT_LEN, 99)])
        full = torch.tensor([tokens(2048, 3) + tokens(PROMPT_LEN, 99)])
        res["ttft"]["icl_2048_s"] = best(2, lambda: m(full, logits_to_keep=1))
        cart = prefix_cache(256, 2)

        def with_cart():
            c = copy.deepcopy(cart)
            m(q, past_key_values=c, use_cache=True, logits_to_keep=1)

        res["ttft"]["cartridge_256_s"] = best(3, with_cart)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    r = ours()
    p = pytorch()
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    lines = [
        f"Machine: {os.cpu_count()} threads; f32 matmul {r['matmul_gflops']:.0f} GFLOP/s, "
        f"memory read {r['read_bandwidth_gbs']:.1f} GB/s (measured in this run). "
        f"PyTorch: {p['torch'] if p else 'not installed'}.",
        "",
        "| figure | ours (tok/s) | PyTorch (tok/s) | ours / PyTorch | physical limit (tok/s) | ours / limit |",
        "|---|---|---|---|---|---|",
    ]
    for e in r["prefill"]:
        pt = p["prefill"][e["tokens"]] if p else None
        ratio = f"{e['tokens_per_s'] / pt:.2f}" if pt else "-"
        lines.append(
            f"| prefill {e['tokens']} tokens, batch 1 | {fmt(e['tokens_per_s'])} | {fmt(pt)} | {ratio} | "
            f"{fmt(e['limit_tokens_per_s'])} | {e['tokens_per_s'] / e['limit_tokens_per_s']:.2f} |"
        )
    for e in r["decode"]:
        # PyTorch runs the dequantised f32 model only (transformers has no quantised CPU kernels).
        pt = p["decode"][(e["prefix"], e["batch"])] if p and e["weights"] == "f32" else None
        ratio = f"{e['tokens_per_s'] / pt:.2f}" if pt else "-"
        lines.append(
            f"| decode {e['weights']}, prefix {e['prefix']}, batch {e['batch']} | {fmt(e['tokens_per_s'])} | {fmt(pt)} | {ratio} | "
            f"{fmt(e['limit_tokens_per_s'])} | {e['tokens_per_s'] / e['limit_tokens_per_s']:.2f} |"
        )
    t = r["ttft"]
    lines += [
        "",
        "| time to first token (16-token question) | ours (s) | PyTorch (s) |",
        "|---|---|---|",
        f"| after a 256-token cartridge | {t['cartridge_256_s']:.3f} | {p['ttft']['cartridge_256_s']:.3f} |" if p
        else f"| after a 256-token cartridge | {t['cartridge_256_s']:.3f} | - |",
        f"| after prefilling 2048 tokens of context (ICL) | {t['icl_2048_s']:.3f} | {p['ttft']['icl_2048_s']:.3f} |" if p
        else f"| after prefilling 2048 tokens of context (ICL) | {t['icl_2048_s']:.3f} | - |",
        f"| ICL / cartridge | {t['speedup']:.0f}x | "
        + (f"{p['ttft']['icl_2048_s'] / p['ttft']['cartridge_256_s']:.0f}x |" if p else "- |"),
        "",
        f"KV bytes (f32): 256-token cartridge {r['kv_bytes']['cartridge_256'] / 2**20:.1f} MiB, "
        f"2048 tokens of context {r['kv_bytes']['context_2048'] / 2**20:.1f} MiB per sequence.",
    ]
    text = "\n".join(lines)
    write_report(text, args.out)


if __name__ == "__main__":
    main()
