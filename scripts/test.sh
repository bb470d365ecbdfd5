#!/usr/bin/env bash
# Runs every test of the workspace. Needs nothing running beforehand: tests start their own
# redis-server processes (and Redis Clusters) on free loopback ports and an in-process S3
# server. Installs redis-server (Debian/Ubuntu apt) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "redis-server not found: installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# The distribution's service is not needed (tests start their own servers).
redis-server --version

# The real tus clients tests/tus_clients.rs runs: tus-js-client (npm, run by Node) and tuspy
# (PyPI), pinned in tests/clients.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "node/npm not found: installing them with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
npm ci --prefix tests/clients --no-audit --no-fund --silent
# The browser test (tests/browser.rs): the example page's Uppy (npm), and Debian's chromium,
# which puppeteer-core (in tests/clients) drives headless; no browser is downloaded.
npm ci --prefix examples/browser --no-audit --no-fund --silent
if ! command -v chromium >/dev/null 2>&1; then
  echo "chromium not found: installing it with apt-get" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
chromium --version
python3 -m pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt

# The whole workspace, every feature, doctests included (and the examples built, which the
# browser test runs).
cargo test --workspace --all-features --no-fail-fast
echo "== browser screenshots (the finished Dashboards of tests/browser.rs)"
ls -1 "$PWD"/target/browser-artifacts/*.png

# The layers crate must also build and pass with no features and with each feature alone.
for features in "" rate-limit idempotency expiry count-limit redis keys; do
  echo "== upgate-layers features: [${features}]"
  cargo test -p upgate-layers --no-default-features ${features:+--features "$features"} --quiet
done
