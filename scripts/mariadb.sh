#!/usr/bin/env bash
# A private MariaDB for tests and benchmarks: its own data directory, socket and loopback port,
# run as the current user, never the system service.
#
#   scripts/mariadb.sh start DIR PORT [binlog|nobinlog|tls]
#                                                        init DIR if needed, start, create users;
#                                                        tls: binlog on, and TCP clients must use TLS
#   scripts/mariadb.sh stop DIR                           clean shutdown
#   scripts/mariadb.sh kill DIR                           kill -9 (crash tests)
#
# Users created (password 'usp-test-pw'): `usp` with all privileges on database `usp_test` plus
# REPLICATION SLAVE and BINLOG MONITOR (REPLICATION CLIENT), and `usp_norepl` with the same data
# privileges but no replication privileges (polling fallback tests).
set -euo pipefail

cmd=${1:?usage: mariadb.sh start|stop|kill DIR [PORT] [binlog|nobinlog]}
dir=${2:?data directory required}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sock="$dir/mysqld.sock"
pidfile="$dir/mysqld.pid"

need_server() {
  if ! command -v mariadbd >/dev/null || ! command -v mariadb >/dev/null; then
    echo "mariadb.sh: installing mariadb-server and mariadb-client from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends mariadb-server mariadb-client >/dev/null
  fi
}

alive() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$cmd" in
start)
  port=${3:?port required}
  mode=${4:-binlog}
  need_server
  if alive; then echo "mariadb.sh: already running in $dir" >&2; exit 0; fi
  if [ ! -d "$dir/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$dir/data" --user="$(id -un)" \
      --auth-root-authentication-method=socket --skip-test-db >"$dir/install.log" 2>&1 \
      || { cat "$dir/install.log" >&2; exit 1; }
  fi
  args=(--no-defaults --datadir="$dir/data" --port="$port" --bind-address=127.0.0.1
    --socket="$sock" --pid-file="$pidfile" --log-error="$dir/error.log" --user="$(id -un)"
    --skip-name-resolve --innodb-buffer-pool-size=64M --innodb-log-file-size=32M
    --innodb-flush-log-at-trx-commit=2 --max-connections=500 --server-id=1)
  if [ "$mode" = tls ]; then
    if [ ! -f "$dir/cert.pem" ]; then
      openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/key.pem" -out "$dir/cert.pem" \
        -days 2 -subj /CN=localhost >/dev/null 2>&1
    fi
    args+=(--ssl-cert="$dir/cert.pem" --ssl-key="$dir/key.pem" --require-secure-transport=ON)
  fi
  if [ "$mode" = binlog ] || [ "$mode" = tls ]; then
    args+=(--log-bin="$dir/data/binlog" --binlog-format=ROW --binlog-row-image=FULL
      --binlog-row-metadata=FULL --sync-binlog=0)
  fi
  mariadbd "${args[@]}" >/dev/null 2>&1 &
  for _ in $(seq 1 300); do
    if mariadb-admin --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1; then break; fi
    if ! kill -0 $! 2>/dev/null; then
      echo "mariadb.sh: mariadbd exited; its log:" >&2; tail -20 "$dir/error.log" >&2; exit 1
    fi
    sleep 0.1
  done
  mariadb --no-defaults --socket="$sock" -uroot <<'SQL'
CREATE DATABASE IF NOT EXISTS usp_test;
CREATE USER IF NOT EXISTS 'usp'@'127.0.0.1' IDENTIFIED BY 'usp-test-pw';
GRANT ALL ON usp_test.* TO 'usp'@'127.0.0.1';
GRANT REPLICATION SLAVE, BINLOG MONITOR, RELOAD ON *.* TO 'usp'@'127.0.0.1';
CREATE USER IF NOT EXISTS 'usp_norepl'@'127.0.0.1' IDENTIFIED BY 'usp-test-pw';
GRANT ALL ON usp_test.* TO 'usp_norepl'@'127.0.0.1';
SQL
  echo "mariadb.sh: running on 127.0.0.1:$port ($mode), data in $dir"
  ;;
stop)
  if alive; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  ;;
kill)
  if alive; then kill -9 "$(cat "$pidfile")"; rm -f "$pidfile"; fi
  ;;
*)
  echo "usage: mariadb.sh start|stop|kill DIR [PORT] [binlog|nobinlog]" >&2; exit 2 ;;
esac
