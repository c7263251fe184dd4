#!/bin/bash
# Call D1 (nvidia-h200-x2, fresh): the GPU tests that compiled blocks (now the default) touch; stashes the
# first half of the cutlass libs wheel for D2.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p /root/stash; cp .devrun/big/part.aa .devrun/whl/*.whl /root/stash/
t0=$(date +%s)
timeout 470 python -m pytest -m gpu -v -s -p no:cacheprovider tests/test_model.py tests/test_train_nccl.py \
    tests/test_tools_task.py tests/test_fsdp.py tests/test_ledger.py tests/test_generate.py > $OUT/gpu_tests_D1.log 2>&1
echo "exit $? in $(( $(date +%s) - t0 )) s" >> $OUT/gpu_tests_D1.log
grep -E "::.* (PASSED|FAILED|SKIPPED|ERROR)|sp[0-9] step 1:|^step [0-9]:|passed|failed" $OUT/gpu_tests_D1.log | tail -30
