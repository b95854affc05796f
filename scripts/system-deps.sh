#!/usr/bin/env bash
# Debian packages the tests drive: Chromium (the inspector's browser test, via Playwright with
# Debian's binary, since Playwright's own browser download cannot work here), curl, and for
# `burrow doctor`'s tests a real sshd (openssh-server: the SSH banner on a wrong port) and
# pgbouncer (a transaction-mode pooler the doctor must detect), binutils (readelf). With --all,
# also what the standalone Lambda extension's tests need: debootstrap
# (Debian 11 roots), qemu-user-static (arm64 under emulation), and make, perl, patch, bzip2 and
# xz-utils to build and unpack CPython and its libraries.
# systemd's systemd-analyze checks the units in packaging/systemd.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v curl >/dev/null || missing+=(curl)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v readelf >/dev/null || missing+=(binutils)
if [ "${1:-}" = "--all" ]; then
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  for tool in make perl bzip2 patch; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  command -v xz >/dev/null || missing+=(xz-utils)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: need ${missing[*]}; run as root or install them (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "system-deps: installing ${missing[*]}" >&2
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
fi
