#!/usr/bin/env bash
# Run the distributed test bodies on GPUs with NCCL, in fp32 and bf16 (tolerances: tests/helpers.py,
# docs/testing.md). Usage, on a node with >= 4 GPUs (tests needing more GPUs than present skip):
#   tests/distributed/run_gpu.sh [pytest args]      (ULYSSES_SP_TEST_DTYPES="fp32" for one dtype)
#   tests/distributed/run_gpu.sh tests/distributed/loss/test_loss.py   (named tests instead of the whole suite)
# Every body runs as one process per GPU; CPU-only tests (launcher end-to-end runs) are deselected.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ULYSSES_SP_TEST_BACKEND=nccl
# NVLink multicast stays off (shared hosts): NCCL, torch symmetric memory and NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
targets=(tests/distributed)
for arg in "$@"; do
  case $arg in tests/*) targets=() ;; esac  # tests named: run those only
done
status=0
for dtype in ${ULYSSES_SP_TEST_DTYPES:-fp32 bf16}; do
  echo "=== GPU suite, ${dtype} ==="
  ULYSSES_SP_TEST_DTYPE=$dtype python -m pytest -q -p no:cacheprovider "${targets[@]}" -m "not slow" "$@" || status=1
done
exit $status
