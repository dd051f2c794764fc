#!/usr/bin/env bash
# Set up (venv + pinned stack, once) and run the main job. Extra arguments go to the job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
exec python -m robe_torchrec.train --config configs/synthetic_small.yaml "$@"
