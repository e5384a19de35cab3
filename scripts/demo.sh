#!/usr/bin/env bash
# The main job on the built-in demo model: what the model is, then a chat with the live dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/rotary-gguf inspect
# The demo model was trained on 512-token windows: keep the conversation within that.
exec .venv/bin/rotary-gguf chat --ctx 512 --max-tokens 200
