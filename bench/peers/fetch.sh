#!/usr/bin/env bash
# Fetch the peer servers of `busbench compare` into one directory and write
# DIR/peers.env, which busbench reads. Nothing is started here: busbench
# starts every server itself on loopback, in a temporary directory, and stops
# it after its measurements.
#
#   bench/peers/fetch.sh [DIR]        # default: ${BUSBENCH_PEERS:-$HOME/.cache/busbench-peers}
#
# - Apache Kafka (KRaft): the broker's jars from Maven Central
#   (`mvn dependency:copy-dependencies` on kafka-pom.xml beside this script),
#   started with `java -cp DIR/kafka/* kafka.Kafka server.properties`, which is
#   what bin/kafka-server-start.sh runs.
# - Redis: Debian's `redis-server` (apt-get).
# - NATS: nats-server built from its Go module (`go install`): Debian's
#   nats-server is 2.9.10, which rejects `sync_interval`, and the comparison
#   measures JetStream both with its default sync and with `sync_interval:
#   always`. Without Go, Debian's package is used and the sync-always row is
#   reported as unavailable.
# - For the PNG plots: matplotlib in a virtualenv (PyPI).
# - For the Python producers row: a second virtualenv with pyarrow,
#   confluent-kafka (its wheel bundles librdkafka), nats-py and maturin
#   (PyPI). busbench builds arrowbus's Python package from this tree into
#   it at the start of every compare run, so the row measures this tree.
#
# Re-running is cheap: what is already there is kept.
set -euo pipefail

KAFKA_VERSION=4.2.0
NATS_VERSION=v2.15.2
MATPLOTLIB_VERSION=3.10.7
CONFLUENT_KAFKA_VERSION=2.16.1
NATS_PY_VERSION=2.16.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${1:-${BUSBENCH_PEERS:-$HOME/.cache/busbench-peers}}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
log() { echo "fetch.sh: $*" >&2; }

apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        log "need root for apt-get install $*; install them and re-run"
        exit 1
    fi
    if [ ! -f "$dir/.apt-updated" ]; then
        apt-get update -qq && touch "$dir/.apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# Kafka
kafka_libs="$dir/kafka-$KAFKA_VERSION"
if [ ! -f "$kafka_libs/kafka_2.13-$KAFKA_VERSION.jar" ]; then
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    command -v mvn >/dev/null || apt_install maven
    log "Kafka $KAFKA_VERSION jars from Maven Central -> $kafka_libs"
    rm -rf "$kafka_libs.tmp"
    mvn -q -f "$here/kafka-pom.xml" -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$kafka_libs.tmp" >&2
    rm -rf "$kafka_libs"
    mv "$kafka_libs.tmp" "$kafka_libs"
fi
java_bin="$(command -v java)"

# Redis
if ! command -v redis-server >/dev/null; then
    log "redis-server from Debian"
    apt_install redis-server
fi
redis_bin="$(command -v redis-server)"

# NATS
nats_bin="$dir/bin/nats-server"
nats_note=""
if [ ! -x "$nats_bin" ]; then
    if command -v go >/dev/null; then
        log "nats-server $NATS_VERSION from its Go module"
        mkdir -p "$dir/bin"
        GOBIN="$dir/bin" go install "github.com/nats-io/nats-server/v2@$NATS_VERSION" >&2
    else
        command -v nats-server >/dev/null || apt_install nats-server
        nats_bin="$(command -v nats-server)"
        nats_note="Debian nats-server without sync_interval support"
    fi
fi

# Plots
venv="$dir/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    log "matplotlib $MATPLOTLIB_VERSION into $venv"
    python3 -m venv "$venv" >&2 || { apt_install python3-venv && python3 -m venv "$venv" >&2; }
    "$venv/bin/pip" install -q "matplotlib==$MATPLOTLIB_VERSION" >&2
fi

# Python producers
py_venv="$dir/py-venv"
py_reqs="$here/../../client-py/requirements-test.txt"
if [ ! -x "$py_venv/bin/python" ] || ! "$py_venv/bin/python" -c 'import confluent_kafka, nats, pyarrow' 2>/dev/null; then
    log "confluent-kafka $CONFLUENT_KAFKA_VERSION, nats-py $NATS_PY_VERSION, pyarrow and maturin into $py_venv"
    python3 -m venv "$py_venv" >&2 || { apt_install python3-venv && python3 -m venv "$py_venv" >&2; }
    # pyarrow and maturin at the versions the test suite pins.
    "$py_venv/bin/pip" install -q --disable-pip-version-check \
        "confluent-kafka==$CONFLUENT_KAFKA_VERSION" "nats-py==$NATS_PY_VERSION" \
        "$(grep '^pyarrow==' "$py_reqs")" "$(grep '^maturin==' "$py_reqs")" >&2
fi

cat > "$dir/peers.env" <<EOF
# written by bench/peers/fetch.sh; read by busbench compare
KAFKA_VERSION=$KAFKA_VERSION
KAFKA_LIBS=$kafka_libs
JAVA=$java_bin
REDIS_SERVER=$redis_bin
NATS_SERVER=$nats_bin
NATS_NOTE=$nats_note
PLOT_PYTHON=$venv/bin/python
BENCH_PYTHON=$py_venv/bin/python
EOF
log "wrote $dir/peers.env"
