#!/usr/bin/env bash
# The main job on the built-in demo model: what it is, then a short generation.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/rotary-gguf inspect
.venv/bin/rotary-gguf generate --prompt "The expert said" --tokens 48
