#!/bin/bash
# Call B (same warm nvidia-h200-x4): the second half of the cutlass libs wheel, flash-attn-4 installed as
# docs/flash_attn.md says; one 131,072-token document at sp4 (varlen, flash-attn-4), one 1,048,576-token
# document at sp4 (flash-attn-4, one step).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
L=/tmp/B; rm -rf $L; mkdir -p $L
T() { local to=$1 name=$2; shift 2; local t0=$(date +%s); timeout $to "$@" > $L/$name.log 2>&1; echo "$name exit $? $(( $(date +%s) - t0 )) s" | tee -a $L/times.txt; }
cat /root/stash/part.aa .devrun/big/part.ab > /root/stash/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
rm /root/stash/part.aa
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/stash/*.whl > $L/install.log 2>&1
echo "import site; site.addsitedir('/tmp/site')" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_flash_attn_4.pth"
python3 -c "from flash_attn.cute import flash_attn_varlen_func; from minirl.attention import pick_backend; import torch; print('auto backend:', pick_backend(torch.device('cuda')))" >> $L/install.log 2>&1
cat $L/install.log | tail -3
TS=bench/train_step.py
T 100 long131k_varlen torchrun --standalone --nproc-per-node 4 $TS --sp 4 --tokens 131072 --doc-len 131072 --attn varlen --warmup 1 --steps 2 --out $L/long131k_varlen.json
T 80 long131k_flash torchrun --standalone --nproc-per-node 4 $TS --sp 4 --tokens 131072 --doc-len 131072 --attn flash --warmup 1 --steps 2 --out $L/long131k_flash.json
T 280 long1m_flash torchrun --standalone --nproc-per-node 4 $TS --sp 4 --tokens 1048576 --doc-len 1048576 --attn flash --warmup 0 --steps 1 --out $L/long1m_flash.json
tar czf $OUT/B.tgz -C /tmp B
cat $L/times.txt
for f in $L/*.log; do echo "== $f"; grep -A6 "^training step" $f | grep -v "^---"; grep -iE "error|out of memory" $f | tail -3; done
