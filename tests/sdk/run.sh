#!/usr/bin/env bash
# Runs the official OpenAI SDKs (Python and JavaScript) against the reference gateway
# and publisher, unchanged; then the official Python MCP SDK against the gateway's
# /mcp, with a publisher that publishes an agent. Needs the examples built (cargo build --examples). A
# missing python3 or node skips that SDK with a message; anything else failing fails.
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

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 18181)
export GATEWAY="http://127.0.0.1:$port"
"$target/debug/examples/gateway" --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "$GATEWAY/v1/models" >/dev/null && break; sleep 0.1; done
run_sdks() {
  if command -v python3 >/dev/null; then
    venv="$target/sdk-venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.40' 'mcp>=1.9'
    "$venv/bin/python" tests/sdk/check_python.py
  else
    echo "SKIPPED: python3 not found, the Python OpenAI SDK check did not run"
  fi
  if command -v node >/dev/null && command -v npm >/dev/null; then
    npmdir="$target/sdk-node"
    mkdir -p "$npmdir"
    [ -d "$npmdir/node_modules/openai" ] || (cd "$npmdir" && npm install --silent --no-audit --no-fund openai@^4 >/dev/null)
    cp tests/sdk/check_node.mjs "$npmdir/"
    node "$npmdir/check_node.mjs"
  else
    echo "SKIPPED: node not found, the JavaScript OpenAI SDK check did not run"
  fi
}

# The same clients, served by a publisher on each transport in turn.
for transport in sse ws; do
  echo "-- publisher over $transport"
  "$target/debug/examples/publisher" --gateway "$GATEWAY" --transport "$transport" --echo demo \
    --echo meta-llama/Llama-3.1-8B-Instruct --session-file "$work/session-$transport" >"$work/publisher-$transport.log" 2>&1 &
  publisher=$!
  pids+=("$publisher")
  for _ in $(seq 100); do curl -sf "$GATEWAY/api/v1/llms/demo" | grep -q '"status":"active"' && break; sleep 0.1; done
  run_sdks
  kill -TERM "$publisher"
  wait "$publisher" || true
  for _ in $(seq 100); do curl -sf "$GATEWAY/api/v1/llms/demo" | grep -q '"status":"inactive"' && break; sleep 0.1; done
done

# The official MCP client: the agent `poet` over the echo LLM `demo` as a tool, served
# by a publisher on each transport in turn.
cat >"$work/agents.json" <<'JSON'
{"providers": [],
 "agents": [{"name": "poet", "llm": "demo", "description": "Answers in verse",
             "systemPrompt": "You answer in verse.", "defaultParams": {"temperature": 0.7}}]}
JSON
for transport in sse ws; do
  echo "-- mcp: an agent published over $transport"
  "$target/debug/examples/publisher" --gateway "$GATEWAY" --transport "$transport" --echo demo \
    --config "$work/agents.json" --session-file "$work/session-mcp-$transport" \
    >"$work/publisher-mcp-$transport.log" 2>&1 &
  publisher=$!
  pids+=("$publisher")
  for _ in $(seq 100); do curl -sf "$GATEWAY/api/v1/agents/poet" | grep -q '"status":"active"' && break; sleep 0.1; done
  if command -v python3 >/dev/null; then
    RUN="$transport" "$target/sdk-venv/bin/python" tests/sdk/check_mcp.py
  else
    echo "SKIPPED: python3 not found, the Python MCP SDK check did not run"
  fi
  kill -TERM "$publisher"
  wait "$publisher" || true
  for _ in $(seq 100); do curl -sf "$GATEWAY/api/v1/agents/poet" | grep -q '"status":"inactive"' && break; sleep 0.1; done
done
