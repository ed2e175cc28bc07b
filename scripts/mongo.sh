#!/usr/bin/env bash
# A private MongoDB for tests and benchmarks: mongo-java-server (an in-memory fake of MongoDB
# 5.0 from Maven Central) on a loopback port, never a system service. See
# scripts/mongo-server/PROBE.md for what it does and does not do like a real server.
#
#   scripts/mongo.sh build                 fetch the jars (Maven) and compile the launcher into
#                                          target/mongo-server/; skipped when up to date
#   scripts/mongo.sh run PORT oplog|standalone
#                                          exec the launcher (PORT 0 picks a free one): prints
#                                          `READY <port>`, then takes restart|down|up|quit on
#                                          stdin, one a line, answering OK; exits at stdin EOF
#
# __test__/mongo.js drives `run` for the tests.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
src="$root/scripts/mongo-server"
out="$root/target/mongo-server"
stamp="$out/.built"

die() { echo "mongo.sh: $*" >&2; exit 1; }

need() {
  command -v java >/dev/null || die "java (JDK 17 or later) is required: apt-get install default-jdk-headless, or run scripts/setup.sh --test"
  command -v "$1" >/dev/null || die "$1 is required: apt-get install ${2:-$1}, or run scripts/setup.sh --test"
}

up_to_date() {
  [ -f "$stamp" ] && [ -f "$out/classes/usp/MongoLauncher.class" ] || return 1
  [ -z "$(find "$src/pom.xml" "$src/src" "$root/scripts/mongo.sh" -newer "$stamp" -print -quit)" ]
}

build() {
  if up_to_date; then return 0; fi
  need javac default-jdk-headless
  need mvn maven
  # One build at a time (parallel test processes); the second one finds it done.
  mkdir -p "$out"
  exec 9>"$out.lock"
  flock 9
  if up_to_date; then return 0; fi
  rm -rf "$out/lib" "$out/classes" "$stamp"
  mkdir -p "$out/lib" "$out/classes"
  echo "mongo.sh: fetching mongo-java-server (Maven) into $out/lib" >&2
  mvn -q -B -Dstyle.color=never -f "$src/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$out/lib" >"$out/mvn.log" 2>&1 \
    || { cat "$out/mvn.log" >&2; die "mvn could not fetch the jars (see above)"; }
  javac -nowarn -encoding UTF-8 --release 17 -cp "$out/lib/*" -d "$out/classes" \
    "$src/src/main/java/usp/MongoLauncher.java" || die "javac failed to compile the launcher"
  touch "$stamp"
}

case "${1:-}" in
build)
  build
  ;;
run)
  port=${2:?usage: mongo.sh run PORT oplog|standalone}
  mode=${3:?usage: mongo.sh run PORT oplog|standalone}
  up_to_date || die "the launcher is not built (or is stale): run bash scripts/mongo.sh build first"
  command -v java >/dev/null || die "java (JDK 17 or later) is required"
  # Serial GC: fewer threads on a small machine. Logs (warnings and worse) go to stderr.
  exec java -XX:+UseSerialGC -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
    -cp "$out/classes:$out/lib/*" usp.MongoLauncher "$port" "$mode"
  ;;
*)
  echo "usage: mongo.sh build | run PORT oplog|standalone" >&2
  exit 2
  ;;
esac
