#!/usr/bin/env bash
# Checks the gateway against its own OpenAPI document with Schemathesis (a
# property-based API fuzzer, from PyPI in a venv of its own): the reference gateway
# runs with an echo publisher, Schemathesis reads GET /openapi.json and sends every
# route generated requests. A 5xx, a status, content type, header or body the document
# does not describe fails the run. Needs the examples built (cargo build --examples).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if ! command -v python3 >/dev/null; then
  if [ "${VIRTUAL_LLM_REQUIRE_SERVICES:-}" = 1 ]; then
    echo "python3 is missing: the Schemathesis check cannot run" >&2
    exit 1
  fi
  echo "SKIPPED: python3 not found, the Schemathesis check did not run"
  exit 0
fi
venv="$target/schemathesis-venv"
[ -x "$venv/bin/schemathesis" ] || {
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.32,<5'
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
gateway="http://127.0.0.1:$port"
"$target/debug/examples/gateway" --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "$gateway/readyz" >/dev/null && break; sleep 0.1; done
# A live model, so that answers (whole and streamed) are checked too, not only errors.
"$target/debug/examples/publisher" --gateway "$gateway" --echo demo --echo org/model \
  --session-file "$work/session" >"$work/publisher.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "$gateway/api/v1/llms/demo" | grep -q '"status":"active"' && break; sleep 0.1; done

# Schemathesis keeps a cache in `.schemathesis/` of its working directory: the run's
# temporary one, not the checkout; its settings (schemathesis.toml here) are named.
# A failing run prints its seed: SCHEMATHESIS_SEED=<seed> runs it again.
config="$root/tests/openapi/schemathesis.toml"
# hooks.py: a serializer for the NDJSON bodies the document describes as arrays.
export PYTHONPATH="$root/tests/openapi${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=hooks
seed=()
[ -z "${SCHEMATHESIS_SEED:-}" ] || seed=(--seed "$SCHEMATHESIS_SEED")
cd "$work"
if ! "$venv/bin/schemathesis" --config-file "$config" run "$gateway/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-100}" \
  --request-timeout 10 \
  "${seed[@]}" \
  --workers 2; then
  echo "--- gateway log (last 50 lines)"
  tail -50 "$work/gateway.log"
  exit 1
fi
