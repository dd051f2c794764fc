#!/usr/bin/env bash
# Set up (venv + pinned stack, once) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
exec python -m pytest -q "$@"
