#!/usr/bin/env bash
# The whole test suite, from a fresh clone: setup, lint, Rust unit tests, JavaScript tests
# (contract, error codes, cross-process, batching) and the packed-tarball install test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test

echo "== lint (${SECONDS} s since start)"
cargo fmt --check
# Both clippy runs in the dev profile: the dependencies are checked once for the two.
cargo clippy -- -D warnings
cargo clippy --no-default-features --all-targets -- -D warnings
npx eslint .

echo "== Rust unit tests (core, without Node) (${SECONDS} s)"
cargo test --no-default-features 2>&1 | tee /tmp/usp-cargo-test.log
rust_passed=$(grep -Eo '[0-9]+ passed' /tmp/usp-cargo-test.log | awk '{s+=$1} END {print s+0}')
rust_failed=$(grep -Eo '[0-9]+ failed' /tmp/usp-cargo-test.log | awk '{s+=$1} END {print s+0}')

echo "== JavaScript tests (${SECONDS} s)"
set +e
npx jest --runInBand --json --outputFile=/tmp/usp-jest.json
jest_rc=$?
set -e
js_passed=$(node -e "const r=require('/tmp/usp-jest.json'); console.log(r.numPassedTests)")
js_failed=$(node -e "const r=require('/tmp/usp-jest.json'); console.log(r.numFailedTests + r.numRuntimeErrorTestSuites)")
js_skipped=$(node -e "const r=require('/tmp/usp-jest.json'); console.log(r.numPendingTests + r.numTodoTests)")

echo "== summary: rust ${rust_passed} passed, ${rust_failed} failed; js ${js_passed} passed, ${js_failed} failed, ${js_skipped} skipped (${SECONDS} s)"
echo "$((rust_passed + js_passed)) passed, $((rust_failed + js_failed)) failed"
if [ "$jest_rc" -ne 0 ] || [ "$js_failed" -ne 0 ] || [ "$rust_failed" -ne 0 ] || [ "$js_skipped" -ne 0 ]; then
  exit 1
fi
