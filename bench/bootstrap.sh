#!/usr/bin/env bash
# What `make bench` / `make bench-quick` need beyond scripts/bootstrap.sh: TAYGA (the reference
# translator) and a C compiler for bench/*.c (Debian packages, apt-get when run as root), and
# matplotlib for the chart (the `bench` extra, into .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v tayga >/dev/null || ! command -v gcc >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "bench/bootstrap: installing tayga, gcc"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      tayga gcc libc6-dev >/dev/null
  else
    echo "bench/bootstrap: tayga or gcc missing (run as root to install them)" >&2
  fi
fi

stamp=.venv/.sixgate-bench-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bench/bootstrap: installing the bench extra (matplotlib) into .venv"
  .venv/bin/pip install -q -e '.[bench]'
  touch "$stamp"
fi
