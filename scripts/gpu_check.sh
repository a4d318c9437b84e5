#!/usr/bin/env bash
# The check a session lent a CUDA GPU runs as it is (issue 23), in about 8 minutes on one H200:
#   1. the tests marked gpu (CUDA against CPU fp32, the bench workers on CUDA, at most one synchronisation per step)
#   2. make bench DEVICE=cuda --quick: dpolab against TRL, both bf16 autocast ("auto" on a GPU with bf16)
#   3. GPT-2 124M on CUDA, one repeat: dpolab against TRL, and the LM head three ways (the fused head as shipped,
#      F.linear + chunked log-softmax, torch.compile of the chunked one) as lockstep rows beside it
# Everything it writes goes under the folder given as its argument (default results/gpu-check), one file per part.
# It needs .venv with a CUDA build of torch (README, "Installing on a GPU machine": make venv TORCH=...).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu-check}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0
PY="${PY:-.venv/bin/python}"
status=0

"$PY" - > "$out/device.txt" <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
PYEOF
cat "$out/device.txt"

"$PY" -m pytest -p no:cacheprovider -q -rs -m gpu tests 2>&1 | tee "$out/pytest-gpu.log" || status=1
"$PY" -m dpolab.bench --quick --device cuda --out "$out/bench-quick" 2>&1 | tee "$out/bench-quick.log" || status=1
"$PY" -m dpolab.bench --device cuda --repeats 1 --ablations chunked-head,compiled-head --out "$out/bench-gpt2-124m" \
    2>&1 | tee "$out/bench-gpt2-124m.log" || status=1
exit $status
