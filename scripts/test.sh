#!/usr/bin/env bash
# Install what the tests need, then run them: `bash scripts/test.sh [pytest args]`.
# Without arguments: the whole suite, every tier; `bash scripts/test.sh -m unit` runs
# the quick one (tests/README.md lists the tiers).
# As root on Debian it installs the real peers the tests run (socat, nginx, haproxy,
# chromium, OpenSSH, nftables, iproute2, iperf3, dnsmasq and dig) with apt; the project and its test
# extras go into ./.venv with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        iproute2 nftables socat procps nginx haproxy chromium openssh-server openssh-client \
        iperf3 dnsmasq bind9-dnsutils \
        >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
