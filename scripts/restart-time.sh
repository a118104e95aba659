#!/usr/bin/env bash
# Restart time of a MyChat data directory: starts the release server on it, and
# prints the milliseconds until it listens and until a first real request (password
# login + the conversation list through mychat-cli) is served. Stops it again.
#   scripts/restart-time.sh DATA_DIR USER PASSWORD [PORT]
# Build first: cargo build --release -p mychat -p mychat-client
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="$1"; USER_NAME="$2"; PASSWORD="$3"; PORT="${4:-7400}"
OUT="$(mktemp)"; HOME_DIR="$(mktemp -d)"
t0=$(date +%s%N)
target/release/mychat --listen "127.0.0.1:$PORT" --data-dir "$DATA" >"$OUT" 2>/dev/null &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -rf "$OUT" "$HOME_DIR"' EXIT
until grep -q "listening on" "$OUT" 2>/dev/null; do
  kill -0 $PID 2>/dev/null || { echo "the server exited"; exit 1; }
  sleep 0.005
done
t1=$(date +%s%N)
MYCHAT_CLI_HOME="$HOME_DIR" target/release/mychat-cli --server "127.0.0.1:$PORT" \
  --user "$USER_NAME" --password "$PASSWORD" --json conversations >/dev/null
t2=$(date +%s%N)
echo "listening_ms=$(( (t1 - t0) / 1000000 )) first_request_ms=$(( (t2 - t0) / 1000000 ))"
