#!/usr/bin/env bash
# Install what `--features cuda` needs to BUILD (not a GPU, not a driver) from NVIDIA's CUDA wheels
# on PyPI, into a cache folder, and print the environment that points the build at it.
#
#   eval "$(scripts/install-cuda.sh)"        # install if missing, then export CUDA_HOME, PATH, ...
#   scripts/install-cuda.sh --runtime-libs   # also cuBLAS, cuRAND and NVRTC, to RUN on a GPU
#                                            # machine that has a driver but no CUDA libraries
#
# What is installed (CUDA 13.0 by default, the version of the driver (580) on the H200 machines this
# project is tested on; a driver runs PTX of its own CUDA version or older, so build with a toolkit
# no newer than the target machine's driver):
#   nvidia-cuda-nvcc     nvcc, ptxas, fatbinary, nvlink
#   nvidia-nvvm          cicc and libdevice (nvcc's device front end)
#   nvidia-cuda-crt      crt/ headers nvcc includes
#   nvidia-cuda-runtime  cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, ... and libcudart_static.a
#   nvidia-cuda-cccl     cub/thrust/libcu++ headers
# All of them unpack into one `nvidia/cu13/` tree laid out like a CUDA toolkit (bin/, include/,
# lib/, nvvm/), which becomes CUDA_HOME. No libcuda (the driver) is involved at build time: the
# cuda binary loads the driver when `--device cuda` is asked for (scripts/build-cuda.sh).
#
# Environment (all optional):
#   CARTRIDGE_CUDA_VERSION   toolkit version, 13.0 (default) .. 13.x: the wheels' "13.N.*" releases
#   CARTRIDGE_CUDA_DIR       cache folder [${CARTRIDGE_HOME:-$HOME/.cache/cartridge}/cuda]
#   CUDA_COMPUTE_CAP         GPU architecture the kernels are compiled for [90: H100/H200]
#   PYTHON                   the python with pip [python3]
#
# Idempotent (a finished install is recognised by its stamp file) and atomic (wheels are unpacked
# into a temporary folder that is renamed into place once complete). Messages go to stderr; stdout
# carries only the `export` lines.
set -euo pipefail

RUNTIME_LIBS=0
for arg in "$@"; do
    case "$arg" in
        --runtime-libs) RUNTIME_LIBS=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "error: unknown argument $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

VERSION="${CARTRIDGE_CUDA_VERSION:-13.0}"
MAJOR="${VERSION%%.*}"
MINOR="${VERSION#*.}"
if [ "$MAJOR" != "13" ] || ! [[ "$MINOR" =~ ^[0-9]+$ ]]; then
    echo "error: CARTRIDGE_CUDA_VERSION=$VERSION: only CUDA 13.N is supported (the cu13 wheels)" >&2
    exit 2
fi
CACHE="${CARTRIDGE_CUDA_DIR:-${CARTRIDGE_HOME:-$HOME/.cache/cartridge}/cuda}"
DEST="$CACHE/$VERSION"
HOME_DIR="$DEST/nvidia/cu$MAJOR"
PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"

# The build toolkit. `==13.N.*` picks the newest patch release of that minor version.
BUILD_PACKAGES=(
    "nvidia-cuda-nvcc==$VERSION.*"
    "nvidia-nvvm==$VERSION.*"
    "nvidia-cuda-crt==$VERSION.*"
    "nvidia-cuda-runtime==$VERSION.*"
    "nvidia-cuda-cccl==$VERSION.*"
)
# Libraries candle opens at run time on a GPU (cuRAND numbers its own versions: 10.4 is the
# CUDA 13 series).
RUNTIME_PACKAGES=(
    "nvidia-cublas==$VERSION.*"
    "nvidia-cuda-nvrtc==$VERSION.*"
    "nvidia-curand>=10.4,<11"
)

install_set() { # install_set STAMP PACKAGE...
    local stamp="$1"
    shift
    if [ -f "$DEST/$stamp" ]; then
        return 0
    fi
    if [ -z "$PYTHON" ]; then
        echo "error: python3 with pip is needed to install the CUDA wheels" >&2
        exit 1
    fi
    mkdir -p "$CACHE"
    local work
    work="$(mktemp -d "$CACHE/.install.XXXXXX")"
    # Start from what is already installed so the rename below keeps it.
    if [ -d "$DEST" ]; then
        cp -a "$DEST/." "$work/"
    fi
    echo "installing $* into $DEST ..." >&2
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
        --only-binary=:all: --upgrade --target "$work" "$@" >&2; then
        rm -rf "$work"
        echo "error: pip could not install $*" >&2
        exit 1
    fi
    date -u +%Y-%m-%dT%H:%M:%SZ >"$work/$stamp"
    rm -rf "$DEST.old"
    if [ -d "$DEST" ]; then mv "$DEST" "$DEST.old"; fi
    mv "$work" "$DEST"
    rm -rf "$DEST.old"
}

install_set .build-toolkit "${BUILD_PACKAGES[@]}"
if [ "$RUNTIME_LIBS" = 1 ]; then
    install_set .runtime-libs "${RUNTIME_PACKAGES[@]}"
fi

NVCC="$HOME_DIR/bin/nvcc"
if [ ! -x "$NVCC" ]; then
    echo "error: $NVCC is missing after the install (delete $DEST and retry)" >&2
    exit 1
fi

# candle-kernels links `-lcudart`; the wheel has libcudart.so.13 (no unversioned name) and
# libcudart_static.a. link/ holds `libcudart.a`, the static runtime, and nothing else, so the cuda
# binary carries the CUDA runtime inside it (as nvcc links by default) and needs no libcudart.so
# at run time: only the driver, which the runtime opens itself when it is first used.
mkdir -p "$HOME_DIR/link"
ln -sfn ../lib/libcudart_static.a "$HOME_DIR/link/libcudart.a"

# A one-line probe: nvcc must find its own headers and compile a half/bfloat16 kernel to PTX.
PROBE_DIR="$(mktemp -d)"
trap 'rm -rf "$PROBE_DIR"' EXIT
cat >"$PROBE_DIR/probe.cu" <<'CU'
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void probe(__nv_bfloat16 *x, __half *y) { y[0] = __float2half(__bfloat162float(x[0])); }
CU
if ! PATH="$HOME_DIR/bin:$PATH" "$NVCC" --ptx -arch=compute_"${CUDA_COMPUTE_CAP:-90}" \
    -o "$PROBE_DIR/probe.ptx" "$PROBE_DIR/probe.cu" >"$PROBE_DIR/log" 2>&1; then
    echo "error: $NVCC cannot compile a probe kernel:" >&2
    cat "$PROBE_DIR/log" >&2
    exit 1
fi
echo "CUDA $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') toolkit ready: $HOME_DIR" >&2

# The environment for the build (scripts/build-cuda.sh evaluates it).
cat <<EOF
export CUDA_HOME="$HOME_DIR"
export CUDA_PATH="$HOME_DIR"
export NVCC="$NVCC"
export PATH="$HOME_DIR/bin:\$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARTRIDGE_CUDA_LINK_DIR="$HOME_DIR/link"
EOF
if [ "$RUNTIME_LIBS" = 1 ]; then
    echo "export LD_LIBRARY_PATH=\"$HOME_DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
fi
