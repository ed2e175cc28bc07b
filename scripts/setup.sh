#!/usr/bin/env bash
# Prepares a fresh machine: Debian build tools if missing, npm dependencies, the Rust build.
# `--test` also installs what the test suite needs: the MariaDB test server, openssl, a JDK
# and Maven for the MongoDB test server (which it then builds), Redis, and Chromium for the
# browser test.
# Idempotent: steps that are already done are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v python3 >/dev/null || missing+=(python3)
command -v pkg-config >/dev/null || missing+=(pkg-config)
# OpenSSL headers: the binlog client crate (mysql_cdc) links OpenSSL.
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
if [ "${1:-}" = "--test" ]; then
  # openssl makes the certificate of the TLS-only test server.
  command -v openssl >/dev/null || missing+=(openssl)
  # The MariaDB test server (binlog capture tests and benchmarks) and its client tools.
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  command -v mariadb >/dev/null || missing+=(mariadb-client)
  # The MongoDB test server (scripts/mongo.sh): mongo-java-server, fetched with Maven, run on a JDK.
  command -v javac >/dev/null || missing+=(default-jdk-headless)
  command -v mvn >/dev/null || missing+=(maven)
  # Redis for the scale-out tests (scripts/redis.sh).
  command -v redis-server >/dev/null || missing+=(redis-server)
  # Headless Chromium for the dashboard's browser test (driven by playwright-core).
  command -v chromium >/dev/null || missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "setup: Rust (cargo) is required: https://rustup.rs" >&2; exit 1; }
command -v node >/dev/null || { echo "setup: Node.js >= 18 is required" >&2; exit 1; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ] || [ package.json -nt node_modules/.package-lock.json ]; then
  # `npm install` rather than `npm ci`: the lock file of this registry mirror lists only the
  # optional platform packages that exist here, which `npm ci` refuses as out of sync.
  echo "setup: npm install"
  npm install --no-audit --no-fund
fi

echo "setup: building the native engine (release)"
npx napi build --platform --release --output-dir native --js index.js --dts index.d.ts

if [ "${1:-}" = "--test" ]; then
  # Fetches the jars from Maven Central once and compiles the launcher (quick when up to date).
  echo "setup: building the MongoDB test server"
  bash scripts/mongo.sh build
fi
