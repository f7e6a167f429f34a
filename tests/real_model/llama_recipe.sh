#!/bin/sh
# The wake and sleep recipes of run.sh's wake check: the publisher runs them as commands
# (no shell of its own), `["sh", ".../llama_recipe.sh", "wake", ...]`.
#
#   llama_recipe.sh wake PIDFILE LOG PYTHON SERVE_MODEL_PY PORT
#     starts serve_model.py on 127.0.0.1:PORT in the background, detached (a session of
#     its own, stdin from /dev/null, output appended to LOG), writes its pid to PIDFILE
#     and returns at once: the model loads after the recipe ended, and the publisher's
#     probe (GET /v1/models) says when it answers.
#   llama_recipe.sh sleep PIDFILE
#     stops it: TERM, waits until it is gone (up to 10 s, else fails), removes PIDFILE.
#     Nothing to stop (no PIDFILE) is a success.
#
# A failure exits non-zero with one line on stderr, which the publisher reports.
set -u

# alive PID: the process exists and is not a zombie (where pid 1 reaps nothing).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  case $(ps -o stat= -p "$1" 2>/dev/null) in Z*) return 1 ;; esac
}

case ${1:-} in
wake)
  [ $# -eq 6 ] || { echo "usage: $0 wake PIDFILE LOG PYTHON SERVE_MODEL_PY PORT" >&2; exit 2; }
  pidfile=$2 log=$3 python=$4 serve=$5 port=$6
  if [ -s "$pidfile" ] && alive "$(cat "$pidfile")"; then
    echo "llama.cpp is already started (pid $(cat "$pidfile"))" >&2
    exit 1
  fi
  # setsid in a non-interactive shell's background job (never a process group leader)
  # execs without forking: $! is the server's own pid. Without setsid (macOS) the server
  # stays in the publisher's session, which changes nothing here.
  detach=
  command -v setsid >/dev/null 2>&1 && detach=setsid
  $detach "$python" "$serve" --port "$port" --alias smollm2 --ctx 1024 --threads 1 \
    </dev/null >>"$log" 2>&1 &
  echo $! >"$pidfile.tmp" && mv "$pidfile.tmp" "$pidfile"
  ;;
sleep)
  [ $# -eq 2 ] || { echo "usage: $0 sleep PIDFILE" >&2; exit 2; }
  pidfile=$2
  [ -e "$pidfile" ] || exit 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do
    alive "$pid" || { rm -f "$pidfile"; exit 0; }
    sleep 0.1
  done
  echo "llama.cpp (pid $pid) still runs 10 s after SIGTERM" >&2
  exit 1
  ;;
*)
  echo "usage: $0 wake PIDFILE LOG PYTHON SERVE_MODEL_PY PORT | sleep PIDFILE" >&2
  exit 2
  ;;
esac
