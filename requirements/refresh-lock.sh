#!/usr/bin/env bash
# Rewrite requirements/lock.txt from a brand-new virtualenv that installs setup.py's requirements as pip resolves
# them today. Run it after changing setup.py, then run the test suite with the new lock before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e ".[test]"
{
  echo "# The tested environment: every package .ci/run installs, at the version CI tested (Python 3.11, x86-64 Linux)."
  echo "# Install with:  pip install -c requirements/lock.txt -e \".[test]\""
  echo "# Refresh after changing setup.py: requirements/refresh-lock.sh (a brand-new venv, then pip freeze)."
  "$venv/bin/pip" freeze --exclude-editable
} > requirements/lock.txt
rm -rf "$(dirname "$venv")"
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
