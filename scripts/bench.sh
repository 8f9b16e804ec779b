#!/usr/bin/env bash
# One command for every figure BENCHMARKS.md reports, measured side by side in one run on this
# machine, into OUT_DIR/report.md (default bench-out/):
#   1. runtime vs PyTorch and the physical limits: prefill, decode at batch 1/8/32, cartridge vs
#      ICL time to first token and KV bytes (scripts/bench_runtime.py);
#   2. self-study: answer tokens/s at 1/8/32 conversations per chunk, and the same answer-role
#      requests replayed in PyTorch (scripts/bench_synth.py);
#   3. a training step vs PyTorch, p = 256 and 1024, 4 x 256 tokens, peak memory
#      (scripts/bench_train.py);
#   4. serving: requests/s, tokens/s and time to first token at 1/8/32 clients, cartridge vs ICL
#      (cargo bench -p cartridge-server --bench serve);
#   5. quality on the example corpus: builds quenmar.cart if OUT_DIR has none (resumable), then
#      `cartridge eval` of the bare model, the corpus in context, the corpus cut to the
#      cartridge's size and the cartridge, on examples/evals/quenmar.jsonl.
# The PyTorch columns need a Python with torch + transformers + gguf (PYTHON=...; see
# scripts/bench_runtime.py); without one they stay empty. Run it on a quiet machine: it takes
# about an hour on 2 cores, most of it the build of step 4. SKIP="runtime synth train serve quality"
# leaves steps out.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out}
py=${PYTHON:-python3}
skip=" ${SKIP:-} "
mkdir -p "$out"
bash scripts/fetch-model.sh
cargo build --release -q
cart=./target/release/cartridge
report="$out/report.md"
{
    echo "# Benchmark run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/^Mem/{print $2}') GiB; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
} > "$report"

section() { printf '\n## %s\n\nCommand: `%s`\n\n' "$1" "$2" >> "$report"; }

if [[ $skip != *" runtime "* ]]; then
    section "Runtime vs PyTorch" "$py scripts/bench_runtime.py"
    "$py" scripts/bench_runtime.py --out "$out/runtime.md" > /dev/null
    cat "$out/runtime.md" >> "$report"
fi
if [[ $skip != *" synth "* ]]; then
    section "Self-study vs PyTorch" "$py scripts/bench_synth.py"
    "$py" scripts/bench_synth.py --out "$out/synth.md" > /dev/null
    cat "$out/synth.md" >> "$report"
fi
if [[ $skip != *" train "* ]]; then
    section "Training step vs PyTorch" "$py scripts/bench_train.py"
    "$py" scripts/bench_train.py --out "$out/train.md" > /dev/null
    cat "$out/train.md" >> "$report"
fi
if [[ $skip != *" serve "* ]]; then
    section "Serving, cartridge vs ICL" "cargo bench -p cartridge-server --bench serve"
    cargo bench -q -p cartridge-server --bench serve > "$out/serve.md"
    cat "$out/serve.md" >> "$report"
fi
if [[ $skip != *" quality "* ]]; then
    build="$cart build examples/corpora/quenmar --out $out/quenmar.cart --num 128 --tokens 512 --epochs 2 --max-answer-tokens 128"
    if [[ ! -f $out/quenmar.cart ]]; then
        $build --resume --json > "$out/build.json"
    fi
    evalcmd="$cart eval --data examples/evals/quenmar.jsonl --corpus examples/corpora/quenmar --cartridge $out/quenmar.cart --plot $out/quenmar-eval.png"
    section "Quality on the example corpus (quenmar, 5,030 tokens; 512-token cartridge)" "$build && $evalcmd"
    { echo '```text'; $evalcmd; echo '```'; } >> "$report"
fi
echo "wrote $report"
