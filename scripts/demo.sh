#!/usr/bin/env bash
# The main job: sets the machine up if needed, then runs the live demo on the embedded default.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --seconds 60 --rate 2000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
exec node examples/demo.js "$@"
