#!/usr/bin/env bash
# Start this host's worker in the background and daphne in the foreground; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"

"$PY" manage.py worker &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null' EXIT INT TERM

cat <<MSG

  Finetune Platform is starting on http://$HOST:$PORT/
  - sign up at        http://$HOST:$PORT/accounts/signup/
  - API docs at       http://$HOST:$PORT/api/docs/
  - first admin:      $PY manage.py createsuperuser   (then http://$HOST:$PORT/admin/)
  Data (database, workspaces, logs) lives in ${FINETUNE_DATA_DIR:-./data}. Ctrl-C stops everything.

MSG
"$PY" -m daphne -b "$HOST" -p "$PORT" finetune_platform.asgi:application
