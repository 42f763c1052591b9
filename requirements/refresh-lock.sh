#!/usr/bin/env bash
# Rewrite requirements/lock.txt from a brand-new virtualenv that installs pyproject.toml's requirements as pip
# resolves them today, plus the build backend that builds the wheel (pyproject.toml's [build-system]). Run it
# after changing pyproject.toml, then run .ci/run with the new lock before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# The build backend in the same resolve: one setuptools version that torch (setuptools<82) and the build accept.
backend=$(python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')
"$venv/bin/pip" install -q -e ".[test,export]" $backend
{
  echo "# The tested environment: every package .ci/run installs, at the version CI tested (Python 3.11, x86-64 Linux)."
  echo "# Install with:  pip install -c requirements/lock.txt -e \".[test,export]\"  (or a built wheel instead of -e ...)"
  echo "# Build the wheel with:  PIP_CONSTRAINT=requirements/lock.txt pip wheel --no-deps -w dist ."
  echo "# Refresh after changing pyproject.toml: requirements/refresh-lock.sh (a brand-new venv, then pip freeze)."
  "$venv/bin/pip" freeze --exclude-editable
  echo "# the build backend (pyproject.toml [build-system])"
  "$venv/bin/pip" freeze --all | grep -i '^setuptools=='
} > requirements/lock.txt
rm -rf "$(dirname "$venv")"
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
