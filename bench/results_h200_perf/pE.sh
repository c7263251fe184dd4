#!/bin/bash
# Call E (nvidia-h200, 1 GPU): whole-block compiled decoder blocks as train.py's GPU default: the compiled =
# eager test (varlen) and the multi-turn tools task on one GPU (train.py, compile on by default).
export PYTHONUNBUFFERED=1
timeout 230 python -m pytest -m gpu -v -s -p no:cacheprovider tests/test_model.py tests/test_tools_task.py \
    -k "compiled_blocks or multi_turn_steps" > $OUT/gpu_tests_E.log 2>&1
echo "exit $?" >> $OUT/gpu_tests_E.log
grep -E "::.* (PASSED|FAILED|SKIPPED|ERROR)|^step [0-9]:|passed|failed|Error" $OUT/gpu_tests_E.log | tail -15
