#!/usr/bin/env bash
# Make a Docker engine answer: install Debian's docker.io if it is missing, start dockerd if it is not running.
# dockerd runs without its default bridge and without iptables rules: containers use the host network, so they
# reach servers on 127.0.0.1 and this machine never creates or addresses any other interface.
set -euo pipefail
log="${DOCKERD_LOG:-/var/log/kftune-dockerd.log}"
docker info >/dev/null 2>&1 && exit 0
need_root() {
  if [[ "$(id -u)" != 0 ]]; then
    echo "no Docker engine answers and $1 needs root (sudo apt-get install docker.io; sudo dockerd)" >&2
    exit 1
  fi
}
if ! command -v dockerd >/dev/null; then
  need_root "installing one"
  apt-get update -qq >&2 || { echo "apt-get update failed: cannot install docker.io" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >&2 \
    || { echo "apt-get install docker.io failed: no Docker engine on this machine" >&2; exit 1; }
fi
if ! pgrep -x dockerd >/dev/null; then
  need_root "starting dockerd"
  nohup dockerd --bridge=none --iptables=false >"$log" 2>&1 &
fi
for _ in $(seq 90); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not answer within 90 s; the end of its log ($log):" >&2
tail -20 "$log" >&2
exit 1
