#!/usr/bin/env bash
# Starts the local services burrow's tests use (PostgreSQL 5432, MariaDB 3306, Redis 6379) when
# they are not answering, with the same commands this machine kind boots them with.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local port=$1 i
  for i in $(seq 1 60); do up "$port" && return 0; sleep 0.5; done
  echo "services: nothing answers on 127.0.0.1:$port after 30 s" >&2
  return 1
}

if ! up 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_for 5432
fi
if ! up 3306; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  wait_for 3306
fi
if ! up 6379; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  wait_for 6379
fi
exit 0
