#!/usr/bin/env bash
# The one-command install: `cargo install --path cli` into a fresh root, then the
# installed binaries run: the gateway starts, a publisher publishes an echo model, and
# llmctl lists it and chats with it. (Debug build, to keep CI short: the same sources
# and the same `cargo install`.)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The workspace's target directory: the dependencies the tests built are reused.
target=${CARGO_TARGET_DIR:-$root/target}
cargo install --quiet --locked --debug --path cli --root "$work/install" --target-dir "$target"
bin="$work/install/bin"
for b in virtual-llm-gateway virtual-llm-publisher llmctl; do
  [ -x "$bin/$b" ] || { echo "cargo install did not install $b" >&2; exit 1; }
done

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
gateway="http://127.0.0.1:$port"
"$bin/virtual-llm-gateway" --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "$gateway/readyz" >/dev/null && break; sleep 0.1; done
"$bin/virtual-llm-publisher" --gateway "$gateway" --echo installed \
  --session-file "$work/session" >"$work/publisher.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "$gateway/api/v1/llms/installed" | grep -q '"status":"active"' && break; sleep 0.1; done

table=$("$bin/llmctl" --gateway "$gateway" get llm)
echo "$table"
echo "$table" | grep -E '^installed +virtual +active ' >/dev/null || {
  echo "llmctl does not list the installed publisher's model as active" >&2
  cat "$work/gateway.log" "$work/publisher.log" >&2
  exit 1
}
answer=$("$bin/llmctl" --gateway "$gateway" chat installed --message "installed with one command")
[ "$answer" = "installed with one command" ] || {
  echo "llmctl chat answered: $answer" >&2
  exit 1
}
echo "cargo install: gateway, publisher and llmctl installed and working"
