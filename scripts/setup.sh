#!/usr/bin/env bash
# Create .venv (if missing) and install lutnn with everything it needs, and the Fashion-MNIST data of
# configs/default.yaml (Debian package dataset-fashion-mnist). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: apt-get could not install dataset-fashion-mnist; configs/default.yaml needs it (see below)"
  fi
  [ -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ] || echo "setup: Fashion-MNIST not found in $FMNIST: run 'apt-get install dataset-fashion-mnist' as root (Debian/Ubuntu), or put {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz in a folder and pass --set data.root=FOLDER"
fi
# The fused STE's native CPU kernels (lutnn/layers/native.py) build on first use with the C compiler;
# without one, training falls back to a slower eager path.
if ! command -v "${CC:-cc}" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null) \
      || echo "setup: apt-get could not install gcc; LUT training will use its slower eager path"
  else
    echo "setup: no C compiler (${CC:-cc}); install gcc for the fast LUT training kernels"
  fi
fi
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
.venv/bin/python -c "import lutnn, torch; from lutnn.layers import native
print('lutnn', lutnn.__version__, '| torch', torch.__version__, '| native CPU kernels', 'built' if native.available() else 'unavailable (eager fallback)')"
