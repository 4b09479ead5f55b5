#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: prepares what the tests need, then
# runs every crate's tests. Extra arguments go to `cargo test`.
#
# The MongoDB store is tested over the wire against a stand-in server
# (tests/mongo/standin.py) that needs two PyPI packages; they go into a virtualenv
# under target/. With MONGODB_URI set, those tests use that server instead.
#
# The status page is tested in headless Chromium driven by chromedriver, cluster
# mode against a real NATS server, client certificates against ones openssl makes,
# and the alert rules with promtool and a real Prometheus scraping the gateway:
# Debian's chromium, chromium-driver, nats-server, openssl and prometheus packages
# are installed if missing, and those tests fail rather than skip without them
# (ELFIN_REQUIRE_BROWSER, ELFIN_REQUIRE_NATS, ELFIN_REQUIRE_PROMETHEUS). The IPv6
# test makes a network namespace of its own (unshare from util-linux, ip from
# iproute2; it needs root) and fails rather than skips without one
# (ELFIN_REQUIRE_NETNS). Webhook deliveries are
# verified by PyPI's standardwebhooks in a virtualenv under target/
# (ELFIN_REQUIRE_WEBHOOK_VERIFIER).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
[ -x /usr/sbin/nats-server ] || [ -x /usr/bin/nats-server ] || missing+=(nats-server)
command -v openssl >/dev/null || missing+=(openssl)
command -v promtool >/dev/null || missing+=(prometheus)
command -v ip >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian's ${missing[*]} for the tests" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q "${missing[@]}" >/dev/null ||
    { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
export ELFIN_REQUIRE_BROWSER=1 ELFIN_REQUIRE_NATS=1 ELFIN_REQUIRE_NETNS=1 ELFIN_REQUIRE_PROMETHEUS=1

venv=target/standin-venv
if [ -z "${MONGODB_URI:-}" ] && ! "$venv/bin/python" -c "import mockupdb, mongomock" 2>/dev/null; then
  echo "preparing the MongoDB stand-in's virtualenv in $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/mongo/requirements.txt
fi

# Webhook deliveries are verified by the reference Standard Webhooks library.
hooks=target/webhooks-venv
if ! "$hooks/bin/python" -c "import standardwebhooks" 2>/dev/null; then
  echo "preparing the webhook receiver's virtualenv in $hooks" >&2
  python3 -m venv "$hooks"
  "$hooks/bin/pip" install --quiet --disable-pip-version-check -r tests/webhooks/requirements.txt
fi
export ELFIN_REQUIRE_WEBHOOK_VERIFIER=1

cargo test --workspace --locked "$@"
