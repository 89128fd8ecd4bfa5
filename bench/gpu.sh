#!/usr/bin/env bash
# bench/gpu.py, then its JSON and its logs (one tarball) copied to DEST: for GPU machines that hand back
# only a few files. Exit status: gpu.py's (1 if anything failed). GPU_OUT: gpu.py's --out (out/gpu).
#     bash bench/gpu.sh [DEST [gpu.py's flags...]]      e.g. bash bench/gpu.sh /tmp/results
set -u
cd "$(dirname "$0")/.."
dest=${1:-}
shift || true
out=${GPU_OUT:-out/gpu}
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" bench/gpu.py --out "$out" "$@"
rc=$?
if [ -n "$dest" ]; then
    mkdir -p "$dest"
    cp "$out/gpu.json" "$dest/"
    tar czf "$dest/gpu_logs.tar.gz" -C "$out" logs results
fi
exit $rc
