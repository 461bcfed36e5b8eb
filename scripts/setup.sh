#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
# Idempotent: a second run with an unchanged pyproject.toml installs nothing.
# On a machine without an NVIDIA GPU, torch is pinned to 2.13.0 (a CPU wheel on this project's machines), so the
# set-up never pulls a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.gptmeg-installed

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

has_cuda_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if has_cuda_gpu; then
        echo "setup: NVIDIA GPU found, installing a CUDA build of torch"
        "${PIP[@]}" install "torch>=2.11"
    else
        echo "setup: no NVIDIA GPU, installing the CPU build torch==2.13.0"
        "${PIP[@]}" install "torch==2.13.0"
    fi
fi

want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "setup: installing gptmeg-deploy and its test dependencies into $VENV"
    "${PIP[@]}" install -e ".[test,validate,serve]"
    echo "$want" > "$STAMP"
fi
