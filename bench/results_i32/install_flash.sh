#!/usr/bin/env bash
# flash-attn-4 4.0.0b36 onto a lent GPU machine (docs/flash_attn.md), whose wheels (101 MB) are more than
# one device call carries (64 MiB): the 92 MB CuTe DSL wheel is split in two (`split -b 46000000`).
# Call A carries .carry/whl1 (the small wheels and cu13part.aa), call B, sent while the machine is
# still warm, .carry/whl2 (cu13part.ab); each starts with this script, which stashes what came and
# installs once both halves are there. Then: FLASH_ONLY=1 bash bench/results_i32/run_gpu.sh
set -uo pipefail
mkdir -p /root/stash
cp .carry/whl1/* .carry/whl2/* /root/stash/ 2>/dev/null
cd /root/stash
[ -e cu13part.aa ] && [ -e cu13part.ab ] || { echo "flash-attn-4: stashed $(ls | wc -l) files, waiting for the other half"; exit 0; }
cat cu13part.aa cu13part.ab > nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
md5sum nvidia_cutlass_dsl_libs_cu13-4.8.1-*.whl  # b45c1bac0786a433970dc75163c36011
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ./*.whl
# The CuTe DSL wheels rely on a .pth file, which Python runs only in a site directory.
echo "import site; site.addsitedir('/tmp/site')" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_flash_attn_4.pth"
python3 -c "from flash_attn.cute.interface import _flash_attn_fwd, _flash_attn_bwd; print('flash-attn-4 imports')"
