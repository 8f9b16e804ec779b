#!/usr/bin/env python3
"""Side-by-side markdown tables from device_bench's rows (ours) and bench_gpu.py's (PyTorch).

    python3 scripts/bench_table.py OURS.jsonl [PYTORCH.jsonl]

Rows are matched on their shape keys (model, p, batch, prefix, ...); a missing file or row leaves
its cells empty, so the table also reads with only one side.
"""
import json
import os
import sys

KEYS = {
    "matmul": ("n",),
    "bandwidth": ("bytes",),
    "train": ("model", "p", "batch", "seq"),
    "decode": ("model", "prefix", "prefix_tokens", "batch"),
    "synth": ("model", "chunk_tokens", "batch", "new_tokens"),
}


def load(path):
    rows = {}
    if path and os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                key = (r["bench"],) + tuple(r.get(k) for k in KEYS.get(r["bench"], ()))
                rows[key] = r
    return rows


def fmt(x, digits=1):
    if x is None:
        return ""
    if isinstance(x, float):
        # Small figures (a smoke run's TFLOP/s) keep three significant digits.
        return f"{x:,.{digits}f}" if abs(x) >= 10 ** (2 - digits) or x == 0 else f"{x:.3g}"
    return str(x)


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else ""


def main():
    ours = load(sys.argv[1])
    torch = load(sys.argv[2] if len(sys.argv) > 2 else None)
    first = next(iter(ours.values()), None) or next(iter(torch.values()), None)
    if first is None:
        print("no rows")
        return
    print(f"Device: {first.get('device')}, compute dtype {first.get('dtype')}.\n")

    def pair(bench):
        keys = sorted({k for k in list(ours) + list(torch) if k[0] == bench}, key=str)
        return [(k, ours.get(k, {}), torch.get(k, {})) for k in keys]

    print("| limit | ours | PyTorch |\n|---|---|---|")
    for k, o, t in pair("matmul"):
        print(f"| matmul {k[1]}^3, TFLOP/s | {fmt(o.get('tflops'))} | {fmt(t.get('tflops'))} |")
    for k, o, t in pair("bandwidth"):
        print(f"| copy, GB/s (read + write) | {fmt(o.get('gb_per_s'))} | {fmt(t.get('gb_per_s'))} |")

    print("\n| training step | ours step (s) | ours tok/s | share of matmul rate | PyTorch tok/s | ours / PyTorch |")
    print("|---|---|---|---|---|---|")
    for k, o, t in pair("train"):
        shape = f"{k[1]}, p={k[2]}, {k[3]} x {k[4]}"
        if o.get("micro_batch") and o["micro_batch"] != k[3]:
            shape += f" (micro-batch {o['micro_batch']})"
        share = o.get("share_of_matmul_rate")
        print(f"| {shape} | {fmt(o.get('step_s'), 3)} | {fmt(o.get('tokens_per_s'), 0)} | "
              f"{'' if share is None else f'{100 * share:.0f}%'} | "
              f"{t.get('error') or fmt(t.get('tokens_per_s'), 0)} | "
              f"{ratio(o.get('tokens_per_s'), t.get('tokens_per_s'))} |")

    print("\n| decode (greedy, after an 8-token prompt) | ours tok/s | bandwidth limit tok/s | PyTorch tok/s | ours / PyTorch |")
    print("|---|---|---|---|---|")
    for k, o, t in pair("decode"):
        new = o.get("new_tokens") or t.get("new_tokens")
        shape = f"{k[1]}, {k[2]} {k[3]}, batch {k[4]}, {new} tokens"
        print(f"| {shape} | {fmt(o.get('tokens_per_s'))} | {fmt(o.get('limit_tokens_per_s'))} | "
              f"{fmt(t.get('tokens_per_s'))} | {ratio(o.get('tokens_per_s'), t.get('tokens_per_s'))} |")

    for k, o, t in pair("synth"):
        print(f"\nSelf-study answer role ({k[1]}): {k[3]} requests after one {k[2]}-token chunk, "
              f"{k[4]} tokens each with the top-20 recorded: ours {fmt(o.get('tokens_per_s'))} "
              f"tok/s, PyTorch {fmt(t.get('tokens_per_s')) or '-'} tok/s"
              f"{', ' + ratio(o.get('tokens_per_s'), t.get('tokens_per_s')) if t else ''}.")


if __name__ == "__main__":
    main()
