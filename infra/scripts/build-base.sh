#!/usr/bin/env bash
# A local stand-in for python:3.11-slim where no image registry is reachable: Debian bookworm (minbase variant)
# with its own python3 (3.11), python3-venv and ca-certificates, made with debootstrap and `docker import`ed.
#   usage: build-base.sh [TAG]   (default kftune-base:bookworm; nothing is done if TAG exists)
set -euo pipefail
tag="${1:-kftune-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "building the base image $tag needs root (debootstrap); or use BASE=python:3.11-slim from a registry" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2 \
    || { echo "apt-get install debootstrap failed: cannot build the base image" >&2; exit 1; }
fi
root="$(mktemp -d /var/tmp/kftune-base.XXXXXX)"
cleanup() {  # unmount whatever debootstrap left mounted, then remove the tree without crossing mounts
  awk -v r="$root/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT
start=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; echo "debootstrap failed (log: $root.log)" >&2; exit 1; }
rm -f "$root.log"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/locale/*
tar -C "$root" --numeric-owner -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase bookworm + python3 python3-venv ca-certificates" - "$tag" >/dev/null
echo "base image $tag built in $((SECONDS - start)) s: $(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec)"
