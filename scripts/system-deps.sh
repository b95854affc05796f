#!/usr/bin/env bash
# Debian packages the tests drive: Chromium (the inspector's browser test, via Playwright with
# Debian's binary, since Playwright's own browser download cannot work here), curl, and for
# `burrow doctor`'s tests a real sshd (openssh-server: the SSH banner on a wrong port) and
# pgbouncer (a transaction-mode pooler the doctor must detect); systemd's systemd-analyze checks
# the units in packaging/systemd (verify, and their exposure with `security --offline`).
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v curl >/dev/null || missing+=(curl)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: need ${missing[*]}; run as root or install them (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "system-deps: installing ${missing[*]}" >&2
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null
fi
