#!/usr/bin/env bash
# Print the bin folder of a PostgreSQL server installation, installing Debian's package if missing.
set -euo pipefail
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
bin="$(find_bin || true)"
if [[ -z "$bin" || ! -x "$bin/initdb" ]]; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "PostgreSQL is not installed and installing it needs root: sudo apt-get install postgresql" >&2
    exit 1
  fi
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
  bin="$(find_bin)"
fi
echo "$bin"
