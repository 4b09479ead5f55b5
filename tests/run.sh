#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: prepares what the tests need, then
# runs every crate's tests. Extra arguments go to `cargo test`.
#
# The MongoDB store is tested over the wire against a stand-in server
# (tests/mongo/standin.py) that needs two PyPI packages; they go into a virtualenv
# under target/. With MONGODB_URI set, those tests use that server instead.
#
# The status page is tested in headless Chromium driven by chromedriver: Debian's
# chromium and chromium-driver packages are installed if missing, and the test
# fails rather than skips without them (ELFIN_REQUIRE_BROWSER).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
  echo "installing Debian's chromium and chromium-driver for the status page test" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q chromium chromium-driver >/dev/null ||
    { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium chromium-driver >/dev/null; }
fi
export ELFIN_REQUIRE_BROWSER=1

venv=target/standin-venv
if [ -z "${MONGODB_URI:-}" ] && ! "$venv/bin/python" -c "import mockupdb, mongomock" 2>/dev/null; then
  echo "preparing the MongoDB stand-in's virtualenv in $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/mongo/requirements.txt
fi

cargo test --workspace --locked "$@"
