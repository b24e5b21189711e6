#!/usr/bin/env bash
# Create .venv (if missing) and install lutnn with everything it needs. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# pip's exit status is kept (a failed install stops the script); only pip's note about an
# unreachable extra index location is dropped from its stderr.
pip_install() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }

pip_install --upgrade pip
pip_install -r requirements.txt
# setuptools' editable build prints a page-long "Editable installation." notice. It is an
# InformationOnly warning, which setuptools documents as filterable through PYTHONWARNINGS; this
# filter matches that one message only, so every other warning and error still shows.
PYTHONWARNINGS="ignore:Editable installation" pip_install --no-deps -e .
.venv/bin/python -c "import lutnn, torch; print('lutnn', lutnn.__version__, '| torch', torch.__version__)"
