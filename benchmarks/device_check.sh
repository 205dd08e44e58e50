#!/usr/bin/env bash
# The GPU checks in one run on a lent device machine (run by hand; CI has no GPU): the adapter's
# CUDA path against the CPU path, extraction against the bare forward and a VOC-sized probe epoch
# (benchmarks/gpu_check.py), then the store benchmark on that machine's disk and cores
# (benchmarks/store_io.py). Results and logs go to $OUT (default benchmarks/out/device).
#
# The device image has PyTorch, timm, scipy and pyarrow but not zarr and its codecs. Fetch their
# wheels once, in the repository root of this checkout (.whl stays out of git):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl \
#     zarr==3.1.6 numcodecs==0.16.6 crc32c==2.9.post0 donfig==0.8.1.post1 google-crc32c==1.9.0
#
# then run it through the device tool with carry [".whl"] and a timeout that leaves a rerun:
#
#   bash benchmarks/device_check.sh
#
# Each step has its own time limit (GPU_CHECK_S, STORE_IO_S seconds), so a slow first step still
# leaves the second its time; gpu_check.py saves its JSON after every stage. A dry run of the script
# here, without .whl: GPU_CHECK_ARGS="--device cpu --images 24 --val-images 8 --epochs 1
# --siglip-images 0" STORE_IO_IMAGES=300 STORE_IO_ARGS="--epoch-images 300 --batch-images 256"
# bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/out/device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/maxa-site \
    .whl/*.whl || { echo "device_check: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/maxa-site:${PYTHONPATH:-}"
fi
# the repository's packages from the checkout itself (an editable install needs the build backend)
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{
  date -u
  nproc
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm, zarr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__, 'zarr', zarr.__version__)"
  df -h "${TMPDIR:-/tmp}" | tail -1
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
timeout "${GPU_CHECK_S:-330}" python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" ${GPU_CHECK_ARGS:-} > "$OUT/gpu_check.log" 2>&1
echo "gpu_check exit $?" | tee -a "$OUT/machine.txt"
timeout "${STORE_IO_S:-200}" python3 benchmarks/store_io.py --images "${STORE_IO_IMAGES:-7000}" --rounds 2 \
  --out "$OUT/store_io.json" ${STORE_IO_ARGS:-} > "$OUT/store_io.log" 2>&1
echo "store_io exit $?" | tee -a "$OUT/machine.txt"
tail -n 40 "$OUT/gpu_check.log" "$OUT/store_io.log"
