#!/usr/bin/env bash
# Make sure Redis, PostgreSQL and MariaDB answer on 127.0.0.1, starting any that is down with the
# machine's own start commands. Under CI=true a service that stays down fails the run.
# Redis is looked for on the port of SA_CACHE_TEST_REDIS when that names 127.0.0.1 or localhost
# (default redis://127.0.0.1:6379/0); a Redis elsewhere (or over TLS) is the caller's to run.
set -u

redis_port() {  # the loopback port of SA_CACHE_TEST_REDIS, or nothing if it is not on loopback
  local url=${SA_CACHE_TEST_REDIS:-redis://127.0.0.1:6379/0} hostport
  case "$url" in redis://*) ;; *) return 0 ;; esac
  hostport=${url#*://}; hostport=${hostport%%/*}; hostport=${hostport##*@}
  case "$hostport" in
    127.0.0.1:*|localhost:*) echo "${hostport##*:}" ;;
    127.0.0.1|localhost) echo 6379 ;;
  esac
}
REDIS_PORT=$(redis_port)

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # name port
  for _ in $(seq 1 60); do port_open "$2" && return 0; sleep 0.5; done
  return 1
}

start_service() {
  case "$1" in
    redis)
      mkdir -p /var/lib/redis /var/log/redis 2>/dev/null
      redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log ;;
    postgresql)
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start ;;
    mariadb)
      start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd ;;
  esac
}

missing=0
entries="postgresql:5432 mariadb:3306"
if [ -n "$REDIS_PORT" ]; then
  entries="redis:$REDIS_PORT $entries"
else
  echo "services: SA_CACHE_TEST_REDIS is not a redis:// URL on 127.0.0.1 or localhost; not checking Redis"
fi
for entry in $entries; do
  name=${entry%%:*}; port=${entry##*:}
  if port_open "$port"; then
    echo "services: $name is up on 127.0.0.1:$port"
    continue
  fi
  echo "services: $name is down; starting it"
  start_service "$name" >/dev/null 2>&1 || true
  if wait_for "$name" "$port"; then
    echo "services: $name started on 127.0.0.1:$port"
  else
    echo "services: $name could not be started on 127.0.0.1:$port" >&2
    missing=1
  fi
done

if [ "$missing" = 1 ] && [ "${CI:-}" = "true" ]; then
  echo "services: a required service is missing and CI=true: failing" >&2
  exit 1
fi
exit 0
