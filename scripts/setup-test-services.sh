#!/usr/bin/env bash
# Make this machine's database servers ready for announcer's tests (idempotent; needs root).
#
# The tests use the local PostgreSQL (5432), MariaDB (3306) and Redis (6379). They create
# their own roles and users; this script only does what a test cannot: start a server that
# is down, and make PostgreSQL check the password of the test role `announcer_pw` (the
# machine's pg_hba.conf trusts every local connection, so a wrong password would pass).
set -euo pipefail

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
if ! mariadb-admin -h 127.0.0.1 -uroot ping >/dev/null 2>&1; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

for hba in /etc/postgresql/*/main/pg_hba.conf; do
  line="host all announcer_pw 127.0.0.1/32 scram-sha-256"
  if ! grep -qxF "$line" "$hba"; then
    # Before the catch-all trust lines: the first matching line wins.
    { echo "$line"; cat "$hba"; } > "$hba.new" && mv "$hba.new" "$hba"
    chown postgres:postgres "$hba" 2>/dev/null || true
  fi
done
for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
psql -q -h 127.0.0.1 -U postgres -d postgres -c "SELECT pg_reload_conf()" >/dev/null
for _ in $(seq 1 50); do mariadb-admin -h 127.0.0.1 -uroot ping >/dev/null 2>&1 && break; sleep 0.2; done
for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.2; done
echo "test services ready"
