#!/usr/bin/env bash
# Runs every check and test of the workspace against real brokers on loopback.
#
#   scripts/test.sh            # format, lints, then every test
#   scripts/test.sh --no-lint  # tests only
#
# Idempotent: a broker already listening is reused; a missing one is installed (Debian
# packages, crates.io, PyPI) and started here, and stopped again on exit.
#
#   Redis         127.0.0.1:6379   REDIS_URL      redis-server (apt: redis-server)
#   NATS + JS     127.0.0.1:4222   NATS_URL       nats-server -js (apt: nats-server)
#   Kafka (tansu) 127.0.0.1:9092   KAFKA_BROKERS  cargo install tansu (first build ~10 min)
#   SQS (moto)    127.0.0.1:4566   SQS_ENDPOINT   pip install 'moto[server]'
#   RabbitMQ      127.0.0.1:5672   RABBITMQ_URL   rabbitmq-server (apt: rabbitmq-server; tests use rabbitmqctl)
#   PostgreSQL    127.0.0.1:5432   POSTGRES_URL   the Debian cluster (apt: postgresql), wal_level = logical
#   Mosquitto     127.0.0.1:1883   MQTT_URL       mosquitto 2 (apt: mosquitto; MQTT 5)
#   Browser tests: chromium (apt) and playwright-core (npm ci in integration-tests/browser)
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
lint=1
for arg in "$@"; do
  case "$arg" in
    --no-lint) lint=0 ;;
    *) echo "usage: $0 [--no-lint]" >&2; exit 2 ;;
  esac
done

state=${TEST_STATE_DIR:-${CARGO_TARGET_DIR:-$root/target}/test-brokers}
mkdir -p "$state"
started=()

log() { printf '\033[1m[test.sh]\033[0m %s\n' "$*" >&2; }

cleanup() {
  local pid
  drop_test_slots
  for pid in "${started[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${started[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

listening() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # name host port seconds
  local i
  for ((i = 0; i < $4 * 10; i++)); do
    listening "$2" "$3" && return 0
    sleep 0.1
  done
  log "$1 did not start on $2:$3; its log is in $state"
  exit 1
}

apt_install() { # package
  log "installing $1 with apt-get"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "$1" >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq "$1" >/dev/null
  fi
}

ensure_redis() {
  if listening 127.0.0.1 6379; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting redis-server on 127.0.0.1:6379"
  redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$state" >"$state/redis.log" 2>&1 &
  started+=($!)
  wait_for redis 127.0.0.1 6379 10
}

ensure_nats() {
  if listening 127.0.0.1 4222; then return; fi
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
  local bin
  bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  log "starting nats-server with JetStream on 127.0.0.1:4222"
  rm -rf "$state/nats"
  "$bin" -a 127.0.0.1 -p 4222 -js -sd "$state/nats" >"$state/nats.log" 2>&1 &
  started+=($!)
  wait_for nats 127.0.0.1 4222 10
}

ensure_kafka() {
  if listening 127.0.0.1 9092; then return; fi
  if ! command -v tansu >/dev/null; then
    log "installing tansu (a Kafka-compatible broker) from crates.io; the first build takes about ten minutes"
    cargo install tansu --locked --features dynostore \
      --target-dir "${TANSU_BUILD_DIR:-$HOME/.cache/tansu-build}" >"$state/tansu-install.log" 2>&1 ||
      { log "cargo install tansu failed; see $state/tansu-install.log"; exit 1; }
  fi
  log "starting tansu on 127.0.0.1:9092 (memory storage)"
  tansu broker --storage-engine memory://tansu/ \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 >"$state/tansu.log" 2>&1 &
  started+=($!)
  wait_for tansu 127.0.0.1 9092 20
}

ensure_sqs() {
  if listening 127.0.0.1 4566; then return; fi
  if ! command -v moto_server >/dev/null; then
    log "installing moto's server from PyPI"
    python3 -m pip install -q 'moto[server]' >"$state/moto-install.log" 2>&1 ||
      { log "pip install moto failed; see $state/moto-install.log"; exit 1; }
  fi
  log "starting moto_server (SQS) on 127.0.0.1:4566"
  moto_server -H 127.0.0.1 -p 4566 >"$state/moto.log" 2>&1 &
  started+=($!)
  wait_for moto 127.0.0.1 4566 30
}

ensure_rabbitmq() {
  if listening 127.0.0.1 5672; then return; fi
  command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
  local bin
  bin=$(command -v rabbitmq-server || echo /usr/sbin/rabbitmq-server)
  log "starting rabbitmq-server on 127.0.0.1:5672"
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=5672 "$bin" >"$state/rabbitmq.log" 2>&1 &
  started+=($!)
  wait_for rabbitmq 127.0.0.1 5672 60
}

# PostgreSQL with logical replication (wal_level = logical, which takes a restart) and room
# for the tests' slots, which run in parallel. A POSTGRES_URL given from outside is used as
# it is. Otherwise the machine's Debian cluster (installed if missing, trust on loopback)
# is configured with ALTER SYSTEM and restarted when its wal_level is not logical yet.
ensure_postgres() {
  if [ -n "${POSTGRES_URL:-}" ]; then return; fi
  local psql=(psql -h 127.0.0.1 -U postgres -d postgres -Atq)
  if ! listening 127.0.0.1 5432; then
    command -v pg_lsclusters >/dev/null || apt_install postgresql
    local version
    version=$(pg_lsclusters -h | awk 'NR == 1 {print $1}')
    [ -n "$version" ] || { log "no PostgreSQL cluster after installing postgresql"; exit 1; }
    local hba=/etc/postgresql/$version/main/pg_hba.conf
    grep -q '^host all postgres 127.0.0.1/32 trust' "$hba" ||
      sed -i '1i host all postgres 127.0.0.1/32 trust\nhost replication postgres 127.0.0.1/32 trust' "$hba"
    log "starting PostgreSQL $version"
    pg_ctlcluster "$version" main start
    wait_for postgresql 127.0.0.1 5432 60
  fi
  if [ "$("${psql[@]}" -c 'SHOW wal_level')" != logical ] ||
    [ "$("${psql[@]}" -c 'SHOW max_replication_slots')" -lt 32 ]; then
    log "setting wal_level = logical and restarting PostgreSQL"
    "${psql[@]}" -c 'ALTER SYSTEM SET wal_level = logical' \
      -c 'ALTER SYSTEM SET max_replication_slots = 32' \
      -c 'ALTER SYSTEM SET max_wal_senders = 32'
    local version
    version=$(pg_lsclusters -h | awk '$3 == 5432 {print $1; exit}')
    pg_ctlcluster "$version" main restart
    local i
    for ((i = 0; i < 300; i++)); do
      "${psql[@]}" -c 'SELECT 1' >/dev/null 2>&1 && break
      sleep 0.1
    done
    [ "$("${psql[@]}" -c 'SHOW wal_level')" = logical ] ||
      { log "PostgreSQL's wal_level is still not logical"; exit 1; }
  fi
}

# Slots a test left behind (a test killed mid-run never reached its cleanup) retain WAL:
# drop the inactive ones with the tests' prefix.
drop_test_slots() {
  [ -z "${POSTGRES_URL:-}" ] || [ "$POSTGRES_URL" = postgres://postgres@127.0.0.1:5432/postgres ] || return 0
  psql -h 127.0.0.1 -U postgres -d postgres -Atq -c \
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'it\\_%' AND NOT active" \
    >/dev/null 2>&1 || true
}

ensure_mosquitto() {
  if listening 127.0.0.1 1883; then return; fi
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt_install mosquitto
  local bin
  bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  # Loopback only, anonymous, sessions kept in memory for the broker's lifetime.
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\n' >"$state/mosquitto.conf"
  log "starting mosquitto on 127.0.0.1:1883"
  "$bin" -c "$state/mosquitto.conf" >"$state/mosquitto.log" 2>&1 &
  started+=($!)
  wait_for mosquitto 127.0.0.1 1883 20
}

# The console's browser tests: Debian's chromium, driven headless by playwright-core
# (npm, pinned in integration-tests/browser/package-lock.json; no browser download).
ensure_browser() {
  [ -x "${CHROMIUM:-/usr/bin/chromium}" ] || apt_install chromium
  command -v node >/dev/null || apt_install nodejs
  command -v npm >/dev/null || apt_install npm
  if [ ! -d "$root/integration-tests/browser/node_modules/playwright-core" ]; then
    log "installing playwright-core with npm ci"
    (cd "$root/integration-tests/browser" && npm ci --no-audit --no-fund >"$state/npm.log" 2>&1) ||
      { log "npm ci failed; see $state/npm.log"; exit 1; }
  fi
}

# librdkafka is built with OpenSSL (rdkafka's `ssl` feature: broker TLS, SASL_SSL, SCRAM).
ensure_build_deps() {
  command -v dpkg >/dev/null || return 0
  dpkg -s libssl-dev >/dev/null 2>&1 || apt_install libssl-dev
  command -v pkg-config >/dev/null || apt_install pkg-config
}

ensure_build_deps

if [ "$lint" = 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --workspace --all-targets -- -D warnings
fi

ensure_redis
ensure_nats
ensure_kafka
ensure_sqs
ensure_rabbitmq
ensure_postgres
ensure_mosquitto
ensure_browser

export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:9092}
export SQS_ENDPOINT=${SQS_ENDPOINT:-http://127.0.0.1:4566}
export RABBITMQ_URL=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export POSTGRES_URL=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export MQTT_URL=${MQTT_URL:-tcp://127.0.0.1:1883}

log "cargo build --workspace --bins --examples"
# The end-to-end tests run every connector's binary and the examples. `cargo test` builds
# the binaries only of packages with tests of their own, so a connector whose tests live
# in integration-tests would otherwise run as an older build left in the target
# directory. Built here once, with the workspace's features; the tests use these
# instead of building each package again.
cargo build --workspace --bins --examples
log "cargo test --workspace"
export TEST_BINARIES_BUILT=1
cargo test --workspace
log "all tests passed"
