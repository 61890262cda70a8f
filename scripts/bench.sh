#!/usr/bin/env bash
# The load benchmark: builds the release gateway and the benchmark, then runs it.
#   scripts/bench.sh                                  # SQLite
#   scripts/bench.sh --postgres postgres://postgres@127.0.0.1:5432/test
#   scripts/bench.sh --quick --seconds 3              # a fast look
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin llm-orch
cargo run --release -p orch-bench -- "$@"
