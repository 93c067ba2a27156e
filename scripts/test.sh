#!/usr/bin/env bash
# Full check: formatting, clippy (warnings are errors), then every test target
# against one local moto server (never real AWS). .ci/run runs exactly this.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

started=$SECONDS
finish() {
  local rc=$?
  stop_moto
  log "test.sh finished with exit code $rc in $((SECONDS - started)) s"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for component in rustfmt clippy; do
  subcommand="${component/rustfmt/fmt}"
  if ! cargo "$subcommand" --version >/dev/null 2>&1; then
    rustup component add "$component" || log "could not add $component (offline?)"
  fi
done

ensure_python_deps

log "cargo fmt --check"
cargo fmt --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
./scripts/check-deploy.sh # deploy/: kustomize, schemas, lint, config, metric names

# Supply chain: licenses, sources and banned (unmaintained) crates.
# cargo-deny is pinned and installed once per machine (about 5 minutes on two
# cores); later runs find it on PATH or in $CARGO_HOME/bin.
CARGO_DENY_VERSION="0.20.2"
if [[ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]]; then
  log "installing cargo-deny $CARGO_DENY_VERSION (cargo install --locked; about 5 minutes, once per machine)"
  cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
fi
# cargo deny resolves the graph for *every* target platform (cargo metadata
# without --filter-platform), so it needs crates a Linux build never
# downloads (windows-sys, anstyle-wincon, ...). `cargo fetch` without
# --target downloads exactly those, from Cargo.lock; after it, deny runs
# offline (it never needs the advisory database for these three checks).
log "cargo fetch --locked (every target's crates, for cargo deny)"
cargo fetch --locked
log "cargo deny --offline check bans licenses sources"
cargo deny --offline check bans licenses sources

start_moto "$(free_port)"
# Not RESET_WORKER_*: the worker's config loader reads every variable with that
# prefix and rejects unknown keys (its unit tests would fail).
export TEST_MOTO_URL="$MOTO_URL"

log "cargo test --all-targets"
cargo test --all-targets
