#!/usr/bin/env bash
# The README's benchmark table, measured: each row RUNS times (default 3), every run
# against a freshly started release server on one data directory (users registered by
# the first run stay; later runs log in by token), NATS as the baseline where a row
# has one. Prints one line per run and the medians; the JSON of every run is kept in
# OUT_DIR (default /tmp/mychat-bench).
#   scripts/bench.sh [ROW ...]      rows: idle login oto oto-light sat sat-any groups groups-half
#                                   groups-sat
#   RUNS=3 DATA=/tmp/mychat-bench-data PORT=7400 NATS=nats://127.0.0.1:4222
#   OTO_LIGHT_RATE=5000 (one-to-one below capacity) GROUP_HALF_RATE (default: half the
#   median msgs/s of the groups runs in OUT_DIR, so run `groups` first; else 1600)
#   GROUP_SAT_RATE (default: the median delivered/s of the sat runs in OUT_DIR over the
#   499 deliveries of a group message, so run `sat` first; else 40): groups-sat offers
#   group messages at the saturate row's delivery rate, i.e. half the groups target's
#   2 x saturate, the other reading of "p99 at half that rate"
# Build first: cargo build --release -p mychat -p mychat-loadtest
# The server runs with cheap password hashing (only the first run's setup hashes) and
# the per-address limits lifted: every simulated user comes from 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"; DATA="${DATA:-/tmp/mychat-bench-data}"; PORT="${PORT:-7400}"
NATS="${NATS:-nats://127.0.0.1:4222}"; OUT_DIR="${OUT_DIR:-/tmp/mychat-bench}"
mkdir -p "$OUT_DIR"
ROWS=("$@"); [ ${#ROWS[@]} -gt 0 ] || ROWS=(idle login oto oto-light sat sat-any groups groups-half groups-sat)
export MYCHAT__AUTH__ARGON2_M_COST_KIB=64 MYCHAT__AUTH__ARGON2_T_COST=1 \
  MYCHAT__SERVER__MAX_CONNECTIONS_PER_ADDR=100000 \
  MYCHAT__AUTH__REGISTRATIONS_PER_ADDR_PER_MIN=1000000 \
  MYCHAT__SERVER__REQUESTS_PER_SEC=100000 MYCHAT__SERVER__REQUEST_BURST=100000
PID=""
stop() { if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; fi; }
trap stop EXIT

run_row() { # NAME LOADTEST-ARGS...
  local name="$1"; shift
  rm -f "$OUT_DIR/$name"-[0-9]*.json
  for i in $(seq 1 "$RUNS"); do
    local log="$OUT_DIR/server-$name-$i.log"
    target/release/mychat --listen "127.0.0.1:$PORT" --data-dir "$DATA" >"$log" 2>&1 &
    PID=$!
    until grep -q "listening on" "$log" 2>/dev/null; do
      kill -0 "$PID" 2>/dev/null || { echo "the server exited:"; cat "$log"; exit 1; }
      sleep 0.05
    done
    target/release/loadtest --server "127.0.0.1:$PORT" --server-pid "$PID" --json "$@" \
      >"$OUT_DIR/$name-$i.json" 2>"$OUT_DIR/$name-$i.err" || true
    stop
    python3 scripts/bench-line.py "$name" "$OUT_DIR/$name-$i.json"
  done
  python3 scripts/bench-line.py --median "$name" "$OUT_DIR"/"$name"-[0-9]*.json
}

derived_rate() { # ROW FIELD DIVISOR DEFAULT: the median FIELD of ROW's runs in OUT_DIR / DIVISOR
  if ls "$OUT_DIR/$1"-[0-9]*.json >/dev/null 2>&1; then
    python3 -c 'import json,sys,statistics; print(max(1, round(statistics.median(json.load(open(f))[sys.argv[1]] for f in sys.argv[3:]) / float(sys.argv[2]))))' "$2" "$3" "$OUT_DIR/$1"-[0-9]*.json
  else
    echo "$4"
  fi
}

for row in "${ROWS[@]}"; do
  case "$row" in
    idle) run_row idle --scenario config/loadtest/idle-19k.toml ;;
    login) run_row login --scenario config/loadtest/login-storm.toml ;;
    oto) run_row oto --scenario config/loadtest/one-to-one-10k.toml ;;
    oto-light) run_row oto-light --scenario config/loadtest/one-to-one-10k.toml --rate "${OTO_LIGHT_RATE:-5000}" ;;
    sat) run_row sat --scenario config/loadtest/saturate-10k.toml --baseline "$NATS" ;;
    sat-any) run_row sat-any --scenario config/loadtest/saturate-10k.toml --contacts 0 ;;
    groups) run_row groups --scenario config/loadtest/groups.toml ;;
    groups-half)
      rate="${GROUP_HALF_RATE:-$(derived_rate groups msgs_per_sec 2 1600)}"
      echo "groups-half at $rate msgs/s"
      run_row groups-half --scenario config/loadtest/groups.toml --mode open --rate "$rate" ;;
    groups-sat)
      rate="${GROUP_SAT_RATE:-$(derived_rate sat deliveries_per_sec 499 40)}"
      echo "groups-sat at $rate msgs/s"
      run_row groups-sat --scenario config/loadtest/groups.toml --mode open --rate "$rate" ;;
    *) echo "unknown row $row"; exit 2 ;;
  esac
done
