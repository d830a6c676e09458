#!/usr/bin/env bash
# Installs what sixgate, its tests and its demo need on a fresh Debian machine:
# system programs (apt-get, when run as root) and the Python dependencies in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iputils-ping dnsutils dnsmasq-base curl nftables procps python3-venv python3-dev gcc libc6-dev
              qemu-system-x86 busybox-static prometheus openssh-server openssh-client
              unbound tnat64 tayga radvd bird2 systemd util-linux)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${missing[*]}"
    apt-get update -qq
    # Packages with a daemon (unbound, ssh) must not start one on this machine: the tests run
    # their own in namespaces. policy-rc.d is Debian's switch for that (kept if already there).
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
      guard=/usr/sbin/policy-rc.d
    fi
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
    if [ -n "$guard" ]; then rm -f "$guard"; fi
    if [ "$status" -ne 0 ]; then exit "$status"; fi
  else
    echo "bootstrap: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
  fi
fi

# tools/vmrun.py (the kvm tests) downloads Debian's kernel package: it needs package lists.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
    && ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  echo "bootstrap: refreshing package lists (the kvm tests fetch linux-image-amd64)"
  apt-get update -qq
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.sixgate-deps
# The compiled helpers (workers/engine/_fastpath.c, workers/_tunread.c) are built by the install:
# again when they change.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ workers/engine/_fastpath.c -nt "$stamp" ] \
    || [ workers/_tunread.c -nt "$stamp" ]; then
  echo "bootstrap: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
