#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned stack, MONAI Label without its heavy extras,
# cotrain itself (editable) and the test tools. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -r requirements.txt
# MONAI Label's own dependency list pulls torchvision (CUDA), sam2 and mlflow: install it
# without them; requirements.txt lists what it really imports.
pip install --no-deps -r requirements-monailabel.txt
pip install --no-deps -e .
pip install -r requirements-dev.txt
