#!/usr/bin/env bash
# A private Redis for tests and benchmarks: its own directory and loopback port, persistence on
# (append-only file, fsync on every write unless told otherwise), run as the current user, never
# the system service.
#
#   scripts/redis.sh start DIR PORT [always|everysec]
#                                      start (installs redis-server from Debian if missing);
#                                      the append-only file's fsync policy, default always
#   scripts/redis.sh stop DIR          clean shutdown (the data stays in DIR)
#   scripts/redis.sh kill DIR          kill -9 (crash tests; the append-only file survives)
set -euo pipefail

cmd=${1:?usage: redis.sh start|stop|kill DIR [PORT]}
dir=${2:?directory required}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pidfile="$dir/redis.pid"

alive() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$cmd" in
start)
  port=${3:?port required}
  fsync=${4:-always}
  case "$fsync" in always|everysec) ;; *) echo "redis.sh: fsync policy must be always or everysec" >&2; exit 2 ;; esac
  if ! command -v redis-server >/dev/null; then
    echo "redis.sh: installing redis-server from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  fi
  if alive; then echo "redis.sh: already running in $dir" >&2; exit 0; fi
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --pidfile "$pidfile" \
    --logfile "$dir/redis.log" --daemonize yes --appendonly yes --appendfsync "$fsync" \
    --save '' --protected-mode yes
  for _ in $(seq 1 100); do
    if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
      echo "redis.sh: running on 127.0.0.1:$port (appendfsync $fsync), data in $dir"
      exit 0
    fi
    sleep 0.1
  done
  echo "redis.sh: redis-server did not answer; its log:" >&2
  tail -20 "$dir/redis.log" >&2 || true
  exit 1
  ;;
stop)
  if alive; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  ;;
kill)
  if alive; then kill -9 "$(cat "$pidfile")"; fi
  rm -f "$pidfile"
  ;;
*)
  echo "redis.sh: unknown command $cmd" >&2
  exit 2
  ;;
esac
