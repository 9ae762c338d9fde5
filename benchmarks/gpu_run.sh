#!/usr/bin/env bash
# The prepared GPU benchmark (issue 4): SD3-Medium size at 1024 px (batch 1 and 4) and DiT-XL/2 at 256 and
# 512 px, random weights, float16, transformer only. Sized for one H200 run of under 8 minutes.
#
# On a machine with CUDA, torch, and the packages of pyproject.toml:
#     OUT=benchmarks/results bash benchmarks/gpu_run.sh
# On this workplace's lent GPU machine (no diffusers there; carry it as wheels, see the device README):
#     here, once:  echo /.whl/ >> .git/info/exclude
#                  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                      --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#     device run:  carry [".whl"], command "bash benchmarks/gpu_run.sh", timeout_s 560
# Results (tables and JSON) land in $OUT; commit them to benchmarks/results/ with this command line.
# Rehearse it on a CPU first (tiny sizes, 5 steps, same commands):  SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_run.sh
set -uo pipefail
if [ "${SMOKE:-0}" = 1 ]; then
    DEV=(--device cpu --dtype float32 --steps 5); SD3=cpu-small; DIT256=cpu-small-dit; DIT512=cpu-small-dit
else
    DEV=(--device cuda --dtype float16); SD3=sd3-medium; DIT256=dit-xl-2-256; DIT512=dit-xl-2-512
fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" >> "$OUT/gpu.txt"
# EMAG's explicit maps take their softmax in place (emag.math.ema.attention_probs): check it on this GPU
[ "${SMOKE:-0}" = 1 ] || python3 -c "
import torch
x = torch.randn(2, 24, 4096, 4429, device='cuda', dtype=torch.float16) * 4
ref = x.softmax(-1)
print('in-place softmax equals softmax (CUDA fp16, SD3-Medium map):', torch.equal(torch.softmax(x, -1, out=x), ref))
" >> "$OUT/gpu.txt" 2>&1
# ... and build it (and P V) one chunk of heads at a time: check the chunks round as the whole map does
[ "${SMOKE:-0}" = 1 ] || python3 -c "
import torch
from emag.math.ema import attention_probs
g = torch.Generator('cuda').manual_seed(0)
q, k, v = (torch.randn(1, 24, n, 64, device='cuda', dtype=torch.float16, generator=g) for n in (4096, 4429, 4429))
whole = attention_probs(q, k, 0.125, False)
out = whole @ v
same_p = same_o = True
for h in range(24):
    p = attention_probs(q[:, h:h + 1], k[:, h:h + 1], 0.125, False)
    same_p &= torch.equal(p, whole[:, h:h + 1]); same_o &= torch.equal(p @ v[:, h:h + 1], out[:, h:h + 1])
print('map by one head equals the whole map (CUDA fp16, SD3-Medium):', same_p, '; P V:', same_o)
" >> "$OUT/gpu.txt" 2>&1

bench() {  # name, then speed.py arguments; each run is capped so one slow case cannot eat the lease
    local name=$1; shift
    timeout 170 python3 benchmarks/speed.py "${DEV[@]}" "$@" --json "$OUT/$name.json" \
        2>&1 | grep -v "Casting directly" | tee "$OUT/$name.txt"
}
bench h200_sd3_medium_b1 --size $SD3 --batch 1 --repeats 2
bench h200_sd3_medium_b4 --size $SD3 --batch 4 --repeats 1 --only cfg emag-full emag-q emag-full-joined emag-q-joined emag-full-straightforward emag-q-straightforward
bench h200_dit_xl_2_256 --size $DIT256 --batch 1 4 --repeats 2
bench h200_dit_xl_2_512 --size $DIT512 --batch 1 --repeats 2
# every other model family at its real size (issue 16): random weights, bfloat16, 10 steps, one timed round
[ "${SMOKE:-0}" = 1 ] || timeout 240 python3 benchmarks/families.py --device cuda --dtype bfloat16 --steps 10 \
    --repeats 1 --family sd35-large flux-dev pixart-sigma sana-1600m --json "$OUT/h200_families.json" \
    2>&1 | grep -v "Casting directly" | tee "$OUT/h200_families.txt"
