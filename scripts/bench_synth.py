#!/usr/bin/env python3
"""Self-study throughput, side by side in one run: our synthesis loop (the `synth_bench` example) and
PyTorch + transformers replaying exactly the same answer-role requests.

Usage (from the repository root, after scripts/fetch-model.sh):

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers gguf accelerate
    /tmp/torchenv/bin/python scripts/bench_synth.py [--corpus DIR] [--batches 1,8,32] [--out F.md]

Our side runs the whole loop (user role, then answer role with the teacher's top-20 recorded at
every answer token) and records each answer-role call: the chunk's token ids, every request's
prompt ids and limits, and its wall time. The PyTorch side then replays those calls with the same
model (the SmolLM2-135M GGUF dequantised to f32), the same threads, greedy decoding, the same stop
tokens and top-20 log-probs at every generated token. It computes the chunk once per call outside
the timer (our loop computed it once for the user role and reuses it), copies that cache per
sequence (transformers has no batch-shared prefix), prefills the left-padded prompts with explicit
positions, and drops finished sequences from the batch, as our decoder does.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_common import load_pytorch_model, write_report


def ours(corpus, batches, dump):
    subprocess.run(
        ["cargo", "run", "-q", "--release", "-p", "cartridge-selfstudy", "--example", "synth_bench",
         "--", corpus, batches, dump],
        check=True,
    )
    with open(dump) as f:
        return json.load(f)


def replay_call(torch, m, call, stop):
    """Answer one recorded call in PyTorch; returns (seconds, generated tokens)."""
    shared = call["shared"]
    prompts = call["prompts"]
    max_tokens = call["max_tokens"]
    k = call["top_k"]
    b = len(prompts)
    p = len(shared)
    with torch.inference_mode():
        pre = m(torch.tensor([shared]), use_cache=True, logits_to_keep=1).past_key_values
        t0 = time.perf_counter()
        cache = copy.deepcopy(pre)
        cache.batch_repeat_interleave(b)
        longest = max(len(q) for q in prompts)
        pads = [longest - len(q) for q in prompts]
        ids = torch.tensor([[0] * pad + q for pad, q in zip(pads, prompts)])
        mask = torch.ones(b, p + longest, dtype=torch.long)
        pos = torch.zeros(b, longest, dtype=torch.long)
        for r, pad in enumerate(pads):
            mask[r, p:p + pad] = 0
            pos[r, pad:] = torch.arange(p, p + longest - pad)
        out = m(ids, past_key_values=cache, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1]
        lengths = [p + len(q) for q in prompts]
        active = list(range(b))
        produced = [0] * b
        topk = [[] for _ in range(b)]
        while True:
            logp = torch.log_softmax(logits.float(), dim=-1)
            vals, idx = logp.topk(k, dim=-1)
            nxt = logp.argmax(-1)
            keep = []
            for row, seq in enumerate(active):
                tok = int(nxt[row])
                topk[seq].append((idx[row].tolist(), vals[row].tolist()))
                produced[seq] += 1
                if tok in stop or produced[seq] >= max_tokens[seq]:
                    continue
                keep.append(row)
            if not keep:
                break
            if len(keep) != len(active):
                sel = torch.tensor(keep)
                cache.batch_select_indices(sel)
                mask = mask[sel]
                nxt = nxt[sel]
                active = [active[r] for r in keep]
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long)], 1)
            pos = torch.tensor([[lengths[s] + produced[s] - 1] for s in active])
            out = m(nxt[:, None], past_key_values=cache, attention_mask=mask, position_ids=pos,
                    use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1]
        return time.perf_counter() - t0, sum(produced)


def pytorch(doc):
    loaded = load_pytorch_model()
    if loaded is None:
        return None
    torch, m = loaded
    stop = set(doc["stop_tokens"])
    res = {"torch": torch.__version__, "runs": {}}
    for run in doc["runs"]:
        secs = tokens = 0
        for call in run["answer_calls"]:
            s, n = replay_call(torch, m, call, stop)
            secs += s
            tokens += n
        res["runs"][run["batch"]] = (secs, tokens)
        print(f"PyTorch batch {run['batch']}: {tokens} answer tokens in {secs:.1f} s = {tokens / secs:.1f} tok/s",
              file=sys.stderr)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="examples/corpora/velmora")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        doc = ours(args.corpus, args.batches, os.path.join(tmp, "calls.json"))
    p = pytorch(doc)
    base = doc["runs"][0]
    lines = [
        f"Machine: {os.cpu_count()} threads. PyTorch: {p['torch'] if p else 'not installed'}. "
        f"Corpus: {args.corpus}; one 512-token chunk per run, user messages up to 48 tokens, answers "
        f"up to 96, teacher top-20 at every answer token.",
        "",
        "| conversations per chunk | whole loop: answer tok/s | vs batch 1 | shared prefill | prompt prefill "
        "| decode (incl. top-k) | answer role: ours tok/s | answer role: PyTorch tok/s | ours / PyTorch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in doc["runs"]:
        t = run["timings"]
        e = run["elapsed_secs"]
        a_secs = sum(c["secs"] for c in run["answer_calls"])
        a_tok = sum(c["generated"] for c in run["answer_calls"])
        ours_ans = a_tok / a_secs
        if p:
            ps, pn = p["runs"][run["batch"]]
            theirs = f"{pn / ps:.1f}"
            ratio = f"{ours_ans / (pn / ps):.2f}x"
        else:
            theirs = ratio = "-"
        lines.append(
            f"| {run['batch']} | {run['answer_tokens_per_sec']:.1f} | "
            f"{run['answer_tokens_per_sec'] / base['answer_tokens_per_sec']:.1f}x | "
            f"{100 * t['prefix_secs'] / e:.0f}% | {100 * t['prompt_secs'] / e:.0f}% | "
            f"{100 * t['decode_secs'] / e:.0f}% | {ours_ans:.1f} | {theirs} | {ratio} |"
        )
    lines += ["", f"Top-k extraction (k = 20 over the vocabulary) costs {doc['topk_ms']:.2f} ms per answer token."]
    text = "\n".join(lines)
    write_report(text, args.out)


if __name__ == "__main__":
    main()
