#!/usr/bin/env bash
# Build (or check) the `cartridge` binary with `--features cuda` on any machine, GPU or not, into
# its own target folder so the CPU build is left alone.
#
#   scripts/build-cuda.sh            # cargo build --release --features cuda -> target/cuda/release/cartridge
#   scripts/build-cuda.sh check      # cargo check --release --features cuda (what CI runs)
#   scripts/build-cuda.sh build -v   # anything after the subcommand goes to cargo
#   scripts/build-cuda.sh test -p cartridge-runtime [TESTNAME]   # the tests of one package, with
#                                    # its `cuda` feature (GPU variants run where there is a GPU)
#   scripts/build-cuda.sh example device_bench   # one example of cartridge-examples
#                                    # -> target/cuda/release/examples/device_bench
#
# The resulting binary runs on CPU-only machines too: it links no CUDA library at build time and
# opens the driver (libcuda.so.1) and cuBLAS / cuRAND / NVRTC only when `--device cuda` is asked
# for, with a clear error when they are missing. Three things make that so:
#
# 1. The CUDA compiler and headers come from NVIDIA's wheels on PyPI (scripts/install-cuda.sh).
# 2. candle-core 0.11 asks cudarc for `dynamic-linking`, which puts libcuda.so.1, libcublas.so,
#    libcurand.so and libnvrtc.so in the binary's NEEDED list: such a binary does not even start
#    without a driver. cudarc's `dynamic-loading` (dlopen at first use) is the same code otherwise,
#    and cudarc refuses both at once, so a feature of our own cannot switch it. This script takes
#    candle-core's published package from cargo's own download cache (its sha256 checked against
#    Cargo.lock), unpacks it under target/cuda/patched/ and changes that one word in its Cargo.toml,
#    then builds with `[patch.crates-io]` pointing at it. Nothing of candle is committed.
# 3. candle-kernels links `-lcudart`; install-cuda.sh provides the static CUDA runtime under that
#    name, so the binary carries the runtime (nvcc's default) instead of needing libcudart.so.
#
# A [patch] changes the lock file (a patched package has no registry source), and other work
# shares this checkout's Cargo.lock: the build therefore runs in a copy of the workspace's files
# (git's tracked and untracked-not-ignored files, refreshed file by file so rebuilds stay
# incremental) under target/cuda/workspace, whose Cargo.lock may change freely.
#
# Environment: CUDA_COMPUTE_CAP (default 90), CARTRIDGE_CUDA_VERSION and CARTRIDGE_CUDA_DIR (see
# install-cuda.sh), CARGO (default cargo). The build is long on small machines (candle's CUDA
# kernels): run it under `nice` where others measure.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:-build}"
case "$MODE" in
    build | check | test | example) shift || true ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "error: unknown subcommand $MODE (build, check, test or example; see --help)" >&2
        exit 2
        ;;
esac
if [ "$MODE" = test ]; then
    # `--features cuda` is the selected package's own feature: name exactly one.
    case " $* " in
        *" -p "* | *" --package "*) ;;
        *)
            echo "error: test needs -p PACKAGE (cartridge-runtime, cartridge-cli, ...)" >&2
            exit 2
            ;;
    esac
fi
CARGO="${CARGO:-cargo}"
OUT="$ROOT/target/cuda"
STAGE="$OUT/workspace"

# 1. The toolkit.
ENV_LINES="$("$ROOT/scripts/install-cuda.sh")"
eval "$ENV_LINES"

# 2. candle-core, patched. Its version and checksum come from the lock file.
lock_field() { # lock_field PACKAGE FIELD
    awk -v name="$1" -v field="$2" '
        $0 == "[[package]]" { in_pkg = 0 }
        $1 == "name" && $3 == "\"" name "\"" { in_pkg = 1 }
        in_pkg && $1 == field { gsub(/"/, "", $3); print $3; exit }
    ' "$ROOT/Cargo.lock"
}
CANDLE_VERSION="$(lock_field candle-core version)"
CANDLE_SHA="$(lock_field candle-core checksum)"
if [ -z "$CANDLE_VERSION" ] || [ -z "$CANDLE_SHA" ]; then
    echo "error: candle-core (from crates.io) not found in Cargo.lock" >&2
    exit 1
fi
CARGO_HOME_DIR="${CARGO_HOME:-$HOME/.cargo}"
find_crate() {
    find "$CARGO_HOME_DIR/registry/cache" -name "candle-core-$CANDLE_VERSION.crate" 2>/dev/null | head -n 1
}
CRATE="$(find_crate)"
if [ -z "$CRATE" ]; then
    # Not downloaded yet (a fresh machine): let cargo fetch what the lock file names.
    (cd "$ROOT" && "$CARGO" fetch --locked >&2)
    CRATE="$(find_crate)"
fi
if [ -z "$CRATE" ]; then
    echo "error: candle-core-$CANDLE_VERSION.crate is not in $CARGO_HOME_DIR/registry/cache" >&2
    exit 1
fi
if [ "$(sha256sum "$CRATE" | cut -d' ' -f1)" != "$CANDLE_SHA" ]; then
    echo "error: $CRATE does not match the checksum in Cargo.lock" >&2
    exit 1
fi
PATCHED="$OUT/patched/candle-core-$CANDLE_VERSION"
if [ ! -f "$PATCHED/.patched-$CANDLE_SHA" ]; then
    rm -rf "$PATCHED"
    mkdir -p "$OUT/patched"
    tar -xzf "$CRATE" -C "$OUT/patched"
    manifest="$PATCHED/Cargo.toml"
    # Exactly one line to change, inside [dependencies.cudarc]'s feature list.
    count="$(awk '/^\[dependencies\.cudarc\]/{s=1;next} /^\[/{s=0} s && /"dynamic-linking"/{n++} END{print n+0}' "$manifest")"
    if [ "$count" != 1 ]; then
        echo "error: candle-core $CANDLE_VERSION: expected one \"dynamic-linking\" in its cudarc" \
            "features, found $count; this script needs updating for that version" >&2
        exit 1
    fi
    awk '/^\[dependencies\.cudarc\]/{s=1} /^\[/ && !/^\[dependencies\.cudarc\]/{s=0}
         s { sub(/"dynamic-linking"/, "\"dynamic-loading\"") } { print }' \
        "$manifest" >"$manifest.new"
    mv "$manifest.new" "$manifest"
    touch "$PATCHED/.patched-$CANDLE_SHA"
fi

# 3. The workspace copy: the files git knows (tracked, or untracked and not ignored). A file is
# copied only when its content differs from the copy's, and then gets a fresh mtime, so cargo
# rebuilds exactly what changed (keeping the original mtimes would hide an edit made between two
# copies behind a newer build).
mkdir -p "$STAGE"
LIST="$OUT/workspace-files"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard --deduplicate) |
        tr '\0' '\n' >"$LIST.all"
else
    (cd "$ROOT" && find . -path ./target -prune -o -path ./fuzz/target -prune -o -type f -print |
        sed 's|^\./||') >"$LIST.all"
fi
: >"$LIST"
while IFS= read -r f; do
    # Skip files deleted in the work tree but still in the index.
    [ -f "$ROOT/$f" ] || continue
    echo "$f" >>"$LIST"
    if ! cmp -s "$ROOT/$f" "$STAGE/$f"; then
        mkdir -p "$(dirname "$STAGE/$f")"
        cp "$ROOT/$f" "$STAGE/$f"
    fi
done <"$LIST.all"
# Files gone from the work tree go from the copy too.
(cd "$STAGE" && find . -type f | sed 's|^\./||' | sort) >"$LIST.staged"
sort "$LIST" | comm -13 - "$LIST.staged" | while IFS= read -r f; do rm -f "$STAGE/$f"; done
rm -f "$LIST.all" "$LIST.staged"

# 4. Build. RUSTFLAGS adds the folder with the static CUDA runtime to the linker's search path.
export CARGO_TARGET_DIR="$OUT"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CARTRIDGE_CUDA_LINK_DIR"
if [ "$MODE" = test ]; then
    CARGO_ARGS=(test --release --features cuda "$@")
elif [ "$MODE" = example ]; then
    CARGO_ARGS=(build --release -p cartridge-examples --features cuda --example "$@")
else
    CARGO_ARGS=("$MODE" --release -p cartridge-cli --features cuda "$@")
fi
echo "cargo ${CARGO_ARGS[*]} (CUDA_HOME=$CUDA_HOME, compute cap $CUDA_COMPUTE_CAP)" >&2
(cd "$STAGE" && "$CARGO" --config "patch.crates-io.candle-core.path='$PATCHED'" "${CARGO_ARGS[@]}")

if [ "$MODE" = build ]; then
    BIN="$OUT/release/cartridge"
    # The point of all the above: no CUDA library may be a load-time dependency.
    needed="$(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
    echo "NEEDED by $BIN: $(echo "$needed" | tr '\n' ' ')" >&2
    if echo "$needed" | grep -E '^lib(cuda|cudart|cublas|cublasLt|curand|nvrtc|nccl|cudnn)\.' >&2; then
        echo "error: $BIN links CUDA libraries at load time; it would not start without them" >&2
        exit 1
    fi
    echo "$BIN"
fi
