#!/usr/bin/env bash
# The GPU check, ready for a session that is lent a GPU (H100/H200): one prepared run, < 10 minutes.
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.md (or gpu-results/gpu_check.md)
# 1. the kernel and CUDA tests on the device (Triton kernels against their torch references, the
#    transform and the compiled step with CUDA graphs); 2. the decode kernel's bandwidth against the
#    device's copy bandwidth; 3. end to end, a Llama-3-8B-shaped model (random bf16) at 32k context,
#    budget 25 %, batch 1: the original (static cache + torch.compile) vs kvpass compiled (CUDA graphs);
# 4. serving, where the machine has vLLM: a Llama-3.2-1B-shaped model (random) served by vLLM as it is
#    and through kvpass's plugin at the same KV memory (benchmarks/vllm_serving.py); skipped, saying
#    so, where vLLM is not installed.
# Each step prints as it goes, so a step cut by its timeout still leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
report="$out/gpu_check.md"
python -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1 || echo "(kvpass not installed: using the tree)"
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo; echo "## 1. kernel and CUDA tests"
  timeout 200 python -m pytest -q -p no:logging -W ignore -rf tests/kernels tests/test_cuda.py 2>&1 | grep -v '^  ' | tail -15
  echo; echo "## 2. decode kernel"
  timeout 90 python benchmarks/decode_kernel.py --slots 8192 16384 32768 --batch 1 8 --context 32768 --budget 0.25 2>&1 | tail -30
  echo; echo "## 3. end to end (Llama-3-8B shapes, random bf16)"
  timeout 300 python benchmarks/gpu_e2e.py --context 32768 --budget 0.25 --batch 1 --new 32 --modes reduce-overhead 2>&1 | grep -v Warning | tail -20
  echo; echo "## 4. serving with vLLM (Llama-3.2-1B shapes, random fp32)"
  if python -c "import vllm" 2>/dev/null; then
    timeout 240 python benchmarks/vllm_serving.py --model random:llama-1b --prompt-tokens 8192 --new 64 --requests 32 --budget 2048 --kv-gib 8 2>&1 | grep -E '^\||requests of' | tail -6
  else
    echo "skipped: vLLM is not installed on this machine"
  fi
} 2>&1 | tee "$report"
echo "wrote $report"
