#!/usr/bin/env bash
# deploy/local/deps.sh — start fleetstream's dependencies without Docker.
#
#   deps.sh up      install (if needed) and start PostgreSQL + a single-node
#                   Apache Kafka 4.x (KRaft) + a schema registry (Apicurio 2.4,
#                   Confluent-compatible API), create roles, database and topics;
#                   prints the export lines for DATABASE_URL and
#                   KAFKA_BOOTSTRAP_SERVERS (and FLEETSTREAM_KAFKA_LIBS, the broker jars)
#                   on stdout (everything else on stderr)
#   deps.sh down    stop the registry, Kafka and the PostgreSQL cluster (data is kept;
#                   the registry keeps its schemas in memory only)
#   deps.sh status  print whether each is up; exit 0 only if both are
#   deps.sh env     print only the export lines:  eval "$(deploy/local/deps.sh env)"
#
# Idempotent: `up` on a machine where everything already runs takes a couple of
# seconds (one short JVM launch to check the broker answers and the topics exist).
# Meant for Debian (12+) as root: local development and CI (CI=true, no stdin,
# no Docker engine). PostgreSQL comes from Debian's packages; Kafka's jars come
# from Maven Central (deploy/kafka/pom.xml) and run on the machine's JDK 17.
#
# Environment:
#   FLEETSTREAM_CACHE     downloads (Maven repo, Kafka jars)   [/var/cache/fleetstream]
#   FLEETSTREAM_STATE     Kafka data, logs, pid, generated config [/var/lib/fleetstream]
#   TELEMETRY_PARTITIONS  partitions of telemetry.v1 (at creation) [12]
#   ALERTS_PARTITIONS     partitions of alerts.v1                  [12]
#   DLQ_PARTITIONS        partitions of telemetry.v1.dlq           [3]
#   KAFKA_HEAP            broker heap (-Xms/-Xmx)                  [1g]
#   KAFKA_START_TIMEOUT   seconds to wait for the broker           [60]
#   REGISTRY_PORT         port of the schema registry (Apicurio, ccompat API) [8089]
#   REGISTRY_HEAP         registry heap (-Xmx)                     [384m]
#   TELEGRAF_VERSION      Telegraf built from Go modules for the line-protocol
#                         tests (exec, mem, influxdb, influxdb_v2, influx parser) [v1.37.2]
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEPLOY_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

CACHE=${FLEETSTREAM_CACHE:-/var/cache/fleetstream}
STATE=${FLEETSTREAM_STATE:-/var/lib/fleetstream}

PG_HOST=127.0.0.1
PG_PORT=5432
PG_CLUSTER=main
PG_MIN_VERSION=15
PG_START_TIMEOUT=${PG_START_TIMEOUT:-60}

KAFKA_HOST=127.0.0.1
KAFKA_PORT=9092
KAFKA_HEAP=${KAFKA_HEAP:-1g}
KAFKA_START_TIMEOUT=${KAFKA_START_TIMEOUT:-60}
KAFKA_STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}
TELEMETRY_PARTITIONS=${TELEMETRY_PARTITIONS:-12}
ALERTS_PARTITIONS=${ALERTS_PARTITIONS:-12}
DLQ_PARTITIONS=${DLQ_PARTITIONS:-3}

FASTAVRO_VERSION=1.13.1
CONFLUENT_KAFKA_VERSION=2.16.1
PYTHON_CLIENTS="$CACHE/python-clients"
TELEGRAF_VERSION=${TELEGRAF_VERSION:-v1.37.2}
TELEGRAF_TAGS=custom,inputs.exec,inputs.mem,outputs.influxdb_v2,outputs.influxdb,parsers.influx
TELEGRAF_BIN="$CACHE/telegraf-$TELEGRAF_VERSION/bin/telegraf"

REGISTRY_HOST=127.0.0.1
REGISTRY_PORT=${REGISTRY_PORT:-8089}
REGISTRY_HEAP=${REGISTRY_HEAP:-384m}
REGISTRY_START_TIMEOUT=${REGISTRY_START_TIMEOUT:-90}
REGISTRY_POM="$DEPLOY_DIR/registry/pom.xml"
REGISTRY_DIR="$CACHE/apicurio-registry"
REGISTRY_PIDFILE="$STATE/registry.pid"
REGISTRY_URL_OUT="http://${REGISTRY_HOST}:${REGISTRY_PORT}/apis/ccompat/v7"

DATABASE_URL_OUT="postgres://fleet:fleet@${PG_HOST}:${PG_PORT}/fleetstream"
KAFKA_BOOTSTRAP_OUT="${KAFKA_HOST}:${KAFKA_PORT}"

KAFKA_POM="$DEPLOY_DIR/kafka/pom.xml"
KAFKA_DATA="$STATE/kafka-data"
LOG_DIR="$STATE/logs"
KAFKA_LOG="$LOG_DIR/kafka.log"
KAFKA_OUT="$LOG_DIR/kafka.out"
KAFKA_PIDFILE="$STATE/kafka.pid"
KAFKA_PROPS="$STATE/server.properties"
KAFKA_LOG4J="$STATE/log4j2.yaml"
ADMIN_PROPS="$STATE/admin.properties"

log() { printf '[deps] %s\n' "$*" >&2; }
die() { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }

print_env() {
    printf 'export DATABASE_URL=%s\n' "$DATABASE_URL_OUT"
    printf 'export KAFKA_BOOTSTRAP_SERVERS=%s\n' "$KAFKA_BOOTSTRAP_OUT"
    # Tests that need a broker of their own (plumbing::testing::PrivateKafka) start it from
    # the same jars.
    printf 'export FLEETSTREAM_KAFKA_LIBS=%s\n' "$KAFKA_LIBS"
    # Interoperability tests run independent clients with this Python (fastavro, confluent-kafka).
    printf 'export FLEETSTREAM_PYTHON=%s\n' "$PYTHON_CLIENTS/bin/python"
    # Schema-registry tests (Confluent wire format) use this registry. Not SCHEMA_REGISTRY_URL
    # itself: the services read that, and would switch every other test to registry framing.
    printf 'export FLEETSTREAM_SCHEMA_REGISTRY_URL=%s\n' "$REGISTRY_URL_OUT"
    # ingest-producer's InfluxDB-compatibility test runs this Telegraf against the ingest.
    printf 'export FLEETSTREAM_TELEGRAF=%s\n' "$TELEGRAF_BIN"
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' must run as root (it installs packages and runs pg_ctlcluster)"
}

# Whether something accepts TCP connections on host:port (bash's /dev/tcp; no nc needed).
port_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# A pid that exists and is not a zombie. (PID 1 in some containers never reaps
# orphans, so a dead, re-parented broker can linger as a zombie.)
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Run "$@" with only stdin/stdout/stderr open. Daemons started from here
# (postgres, the broker) would otherwise inherit every other descriptor of
# whoever ran this script - e.g. a CI runner's pipe, which it may wait on
# until the daemon exits.
# shellcheck disable=SC2016 # expanded by the inner bash
CLOSE_EXTRA_FDS='for p in /proc/$$/fd/*; do n=${p##*/}; if ((n > 2)); then eval "exec $n>&-" 2>/dev/null || true; fi; done'
without_extra_fds() {
    bash -c "$CLOSE_EXTRA_FDS"'; exec "$@"' _ "$@"
}

# ---------------------------------------------------------------------------
# packages
# ---------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    export DEBIAN_FRONTEND=noninteractive
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    # A UTF-8 locale so that the cluster the postgresql package creates gets a
    # UTF8 template1 (without LANG it would be SQL_ASCII).
    # (The postgresql package's postinst may start the new cluster.)
    without_extra_fds env LANG=C.UTF-8 LC_ALL=C.UTF-8 apt-get install -y -qq -o Dpkg::Use-Pty=0 "$@" >&2
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------
PG_VER=""

# Highest installed PostgreSQL server major version >= PG_MIN_VERSION.
find_pg_version() {
    local bin v best=""
    for bin in /usr/lib/postgresql/*/bin/postgres; do
        [[ -x $bin ]] || continue
        v=${bin#/usr/lib/postgresql/}
        v=${v%%/*}
        [[ $v =~ ^[0-9]+$ ]] || continue
        ((v >= PG_MIN_VERSION)) || continue
        if [[ -z $best ]] || ((v > best)); then best=$v; fi
    done
    printf '%s' "$best"
}

pg_running() {
    # pg_ctl status semantics: 0 running, 3 stopped, 4 no/invalid data directory.
    pg_ctlcluster "$PG_VER" "$PG_CLUSTER" status >/dev/null 2>&1
}

pg_logfile() { printf '/var/log/postgresql/postgresql-%s-%s.log' "$PG_VER" "$PG_CLUSTER"; }

pg_fail() {
    local f
    f=$(pg_logfile)
    if [[ -f $f ]]; then
        log "last lines of $f:"
        tail -n 30 "$f" >&2 || true
    fi
    die "$*"
}

# Copy $1 to $2 (owned by postgres) unless identical; return 0 if it changed.
install_if_changed() {
    if [[ -f $2 ]] && cmp -s "$1" "$2"; then return 1; fi
    install -m 0644 -o postgres -g postgres "$1" "$2"
    return 0
}

# Make sure host connections from 127.0.0.1 authenticate by password. Debian's
# default pg_hba.conf already has `host all all 127.0.0.1/32 scram-sha-256`;
# only a hand-edited file (trust/ident/reject) needs our line in front.
# Returns 0 if the file changed.
ensure_pg_hba() {
    local hba="/etc/postgresql/$PG_VER/$PG_CLUSTER/pg_hba.conf" first
    [[ -f $hba ]] || die "missing $hba"
    # The first rule that matches `host all all 127.0.0.1/32` decides.
    first=$(awk '$1 ~ /^host(ssl|nossl)?$/ && $2 == "all" && $3 == "all" && ($4 == "127.0.0.1/32" || $4 == "0.0.0.0/0" || $4 == "all") { print $5; exit }' "$hba")
    case $first in
        scram-sha-256 | md5) return 1 ;;
    esac
    log "pg_hba.conf: first rule for 127.0.0.1 is '${first:-none}'; adding a scram-sha-256 rule in front ($hba)"
    local tmp
    tmp=$(mktemp)
    {
        echo "# added by fleetstream deploy/local/deps.sh: password auth over TCP from 127.0.0.1"
        echo "host    all             all             127.0.0.1/32            scram-sha-256"
        cat "$hba"
    } >"$tmp"
    install -m 0640 -o postgres -g postgres "$tmp" "$hba"
    rm -f "$tmp"
    return 0
}

pg_psql_as_postgres() {
    # cd / : postgres may not be allowed into the caller's directory.
    (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@")
}

pg_up() {
    PG_VER=$(find_pg_version)
    if [[ -z $PG_VER ]] || ! command -v pg_ctlcluster >/dev/null 2>&1; then
        log "no PostgreSQL server >= $PG_MIN_VERSION installed: installing Debian's postgresql"
        apt_install postgresql postgresql-contrib
        PG_VER=$(find_pg_version)
        [[ -n $PG_VER ]] || die "installed postgresql, but no server >= $PG_MIN_VERSION under /usr/lib/postgresql (too old a distribution?)"
    fi
    local confdir="/etc/postgresql/$PG_VER/$PG_CLUSTER"

    if [[ ! -f $confdir/postgresql.conf ]]; then
        log "creating cluster $PG_VER/$PG_CLUSTER (pg_createcluster, UTF8, port $PG_PORT)"
        LANG=C.UTF-8 LC_ALL=C.UTF-8 pg_createcluster --encoding UTF8 --locale C.UTF-8 \
            --port "$PG_PORT" "$PG_VER" "$PG_CLUSTER" >&2
    fi
    grep -Eq "^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf\.d'" "$confdir/postgresql.conf" ||
        die "$confdir/postgresql.conf has no include_dir = 'conf.d': cannot apply deploy/postgres/fleetstream.conf"

    # --- configuration -----------------------------------------------------
    local restart=0 reload=0 pkglibdir tsconf
    install -d -m 0755 -o postgres -g postgres "$confdir/conf.d"
    if install_if_changed "$DEPLOY_DIR/postgres/fleetstream.conf" "$confdir/conf.d/50-fleetstream.conf"; then
        log "installed tuning $confdir/conf.d/50-fleetstream.conf (from deploy/postgres/fleetstream.conf)"
        restart=1
    fi

    # TimescaleDB only if this server has it: preloading a library that does not
    # exist stops PostgreSQL from starting at all.
    pkglibdir="/usr/lib/postgresql/$PG_VER/lib"
    if [[ -x /usr/lib/postgresql/$PG_VER/bin/pg_config ]]; then
        pkglibdir=$(/usr/lib/postgresql/"$PG_VER"/bin/pg_config --pkglibdir)
    fi
    tsconf="$confdir/conf.d/51-fleetstream-timescaledb.conf"
    if [[ -f $pkglibdir/timescaledb.so ]]; then
        local tmp
        tmp=$(mktemp)
        cat >"$tmp" <<'EOF'
# Written by fleetstream deploy/local/deps.sh because timescaledb.so is installed.
shared_preload_libraries = 'timescaledb,pg_stat_statements'
# No phoning home: CI and dev machines have no internet access.
timescaledb.telemetry_level = off
# Compression/retention jobs; must fit in max_worker_processes (16) together
# with parallel query workers and the launcher.
timescaledb.max_background_workers = 8
EOF
        if install_if_changed "$tmp" "$tsconf"; then
            log "TimescaleDB found ($pkglibdir/timescaledb.so): preloading it ($tsconf)"
            restart=1
        fi
        rm -f "$tmp"
    else
        if [[ -f $tsconf ]]; then
            log "TimescaleDB no longer installed: removing $tsconf"
            rm -f "$tsconf"
            restart=1
        fi
        log "TimescaleDB not installed for PostgreSQL $PG_VER: plain PostgreSQL layout"
    fi

    if ensure_pg_hba; then reload=1; fi

    # --- start ---------------------------------------------------------------
    # The socket directory lives on /run, which is empty after a reboot.
    [[ -d /var/run/postgresql ]] || install -d -m 2775 -o postgres -g postgres /var/run/postgresql

    if pg_running; then
        if [[ $restart -eq 1 ]]; then
            log "configuration changed: restarting PostgreSQL $PG_VER/$PG_CLUSTER"
            without_extra_fds pg_ctlcluster "$PG_VER" "$PG_CLUSTER" restart -m fast >&2 || pg_fail "restart failed"
        elif [[ $reload -eq 1 ]]; then
            log "reloading PostgreSQL $PG_VER/$PG_CLUSTER"
            pg_ctlcluster "$PG_VER" "$PG_CLUSTER" reload >&2 || pg_fail "reload failed"
        else
            log "PostgreSQL $PG_VER/$PG_CLUSTER already running"
        fi
        # A postmaster that was killed (-9) can leave a pid file whose process is gone or a
        # zombie: the cluster looks "running" but never answers. Restart it in that case.
        local probe_deadline=$((SECONDS + 10))
        until pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2; do
            if ((SECONDS >= probe_deadline)); then
                log "PostgreSQL $PG_VER/$PG_CLUSTER looks running but does not answer: restarting it"
                pg_ctlcluster "$PG_VER" "$PG_CLUSTER" stop -m immediate >&2 2>&1 || true
                rm -f "/var/lib/postgresql/$PG_VER/$PG_CLUSTER/postmaster.pid"
                without_extra_fds pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start >&2 ||
                    pg_fail "pg_ctlcluster $PG_VER $PG_CLUSTER start failed"
                break
            fi
            sleep 0.5
        done
    else
        log "starting PostgreSQL $PG_VER/$PG_CLUSTER (log: $(pg_logfile))"
        without_extra_fds pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start >&2 || pg_fail "pg_ctlcluster $PG_VER $PG_CLUSTER start failed"
    fi

    local deadline=$((SECONDS + PG_START_TIMEOUT))
    until pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2; do
        ((SECONDS < deadline)) || pg_fail "PostgreSQL not ready on $PG_HOST:$PG_PORT after ${PG_START_TIMEOUT}s"
        sleep 0.5
    done

    # --- roles and database --------------------------------------------------
    # Piped on stdin: the checkout may be somewhere the postgres user cannot read.
    pg_psql_as_postgres -f - <"$DEPLOY_DIR/postgres/bootstrap.sql" >&2 ||
        die "bootstrap (deploy/postgres/bootstrap.sql) failed"

    # The way tests and services connect: password auth over TCP.
    PGPASSWORD=fleet PGCONNECT_TIMEOUT=5 psql -X -q -At -d "$DATABASE_URL_OUT" -c 'select 1' >/dev/null ||
        die "cannot connect as fleet over TCP ($DATABASE_URL_OUT); see $(pg_logfile)"
    log "PostgreSQL $PG_VER ready on $PG_HOST:$PG_PORT: roles fleet (superuser, migration owner), fleet_api, fleet_writer; database fleetstream"
}

pg_down() {
    PG_VER=$(find_pg_version)
    if [[ -z $PG_VER ]] || ! command -v pg_ctlcluster >/dev/null 2>&1; then
        log "PostgreSQL not installed: nothing to stop"
        return 0
    fi
    if pg_running; then
        log "stopping PostgreSQL $PG_VER/$PG_CLUSTER"
        pg_ctlcluster "$PG_VER" "$PG_CLUSTER" stop -m fast >&2 || pg_fail "stop failed"
    else
        log "PostgreSQL $PG_VER/$PG_CLUSTER not running"
    fi
}

# ---------------------------------------------------------------------------
# Kafka
# ---------------------------------------------------------------------------
KAFKA_VERSION=$(sed -n 's:.*<kafka\.version>\([^<]*\)</kafka\.version>.*:\1:p' "$KAFKA_POM" | head -n 1)
[[ -n $KAFKA_VERSION ]] || die "no <kafka.version> in $KAFKA_POM"
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
JAVA=""

java_major() {
    "$1" -XshowSettings:properties -version 2>&1 |
        awk -F'= ' '/java\.specification\.version/ { v = $2; sub(/^1\./, "", v); print int(v); exit }'
}

find_java() {
    [[ -n $JAVA ]] && return 0
    local cand major
    for cand in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java 2>/dev/null || true)" /usr/lib/jvm/java-17-openjdk-*/bin/java; do
        [[ -n $cand && -x $cand ]] || continue
        major=$(java_major "$cand")
        if [[ -n $major ]] && ((major >= 17)); then
            JAVA=$cand
            return 0
        fi
    done
    log "no Java >= 17 found (Kafka 4.x brokers need 17+)"
    apt_install openjdk-17-jre-headless
    for cand in /usr/lib/jvm/java-17-openjdk-*/bin/java; do
        [[ -x $cand ]] && JAVA=$cand && return 0
    done
    die "installed openjdk-17-jre-headless but found no java binary"
}

# Download the broker + tools jars (and their dependencies) once into the cache.
kafka_fetch() {
    local want marker="$KAFKA_LIBS/.fleetstream-complete"
    want=$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)
    if [[ -f $marker && $(<"$marker") == "$want" ]]; then
        return 0
    fi
    find_java
    command -v mvn >/dev/null 2>&1 || apt_install maven
    local tmp="$KAFKA_LIBS.tmp.$$" mvnlog="$CACHE/mvn-kafka-$KAFKA_VERSION.log"
    mkdir -p "$CACHE"
    rm -rf "$tmp"
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS (once; log: $mvnlog)"
    # JAVA_HOME so mvn uses the same (>= 17) JDK; -B/-ntp/no color: CI-friendly log.
    if ! JAVA_HOME=$(dirname "$(dirname "$(readlink -f "$JAVA")")") \
        mvn -B -ntp -Dstyle.color=never -f "$KAFKA_POM" \
            -Dmaven.repo.local="$CACHE/m2" \
            dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
            >"$mvnlog" 2>&1; then
        tail -n 40 "$mvnlog" >&2
        rm -rf "$tmp"
        die "mvn could not fetch Kafka $KAFKA_VERSION (full log: $mvnlog)"
    fi
    local jar
    for jar in "kafka_2.13-$KAFKA_VERSION.jar" "kafka-tools-$KAFKA_VERSION.jar" "kafka-clients-$KAFKA_VERSION.jar"; do
        [[ -f $tmp/$jar ]] || die "mvn finished but $jar is missing (log: $mvnlog)"
    done
    compgen -G "$tmp/log4j-slf4j-impl-*.jar" >/dev/null || die "mvn finished but the log4j slf4j binding is missing"
    printf '%s\n' "$want" >"$tmp/.fleetstream-complete"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
    log "Kafka $KAFKA_VERSION: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS"
}

# Run a Kafka command-line class. Flags for a short-lived JVM: serial GC and C1
# only start noticeably faster on 2 cores; tools-log4j2.yaml keeps stdout clean.
kafka_tool() {
    "$JAVA" -Xms32m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$DEPLOY_DIR/kafka/tools-log4j2.yaml" \
        -cp "$KAFKA_LIBS/*" "$@"
}

# Write $STATE/server.properties, log4j2.yaml and admin.properties; sets
# KAFKA_CONFIG_CHANGED=1 if the broker's configuration changed (a running
# broker must then be restarted).
KAFKA_CONFIG_CHANGED=0
kafka_render_config() {
    local tmp
    mkdir -p "$STATE" "$KAFKA_DATA" "$LOG_DIR"
    tmp=$(mktemp "$STATE/.server.properties.XXXXXX")
    {
        echo "# GENERATED by deploy/local/deps.sh from deploy/kafka/server.properties - edit that file."
        sed "s|@LOG_DIRS@|$KAFKA_DATA|g" "$DEPLOY_DIR/kafka/server.properties"
    } >"$tmp"
    if [[ -f $KAFKA_PROPS ]] && cmp -s "$tmp" "$KAFKA_PROPS"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$KAFKA_PROPS"
        KAFKA_CONFIG_CHANGED=1
    fi
    # A copy, so the running broker does not depend on the checkout it came from.
    if ! { [[ -f $KAFKA_LOG4J ]] && cmp -s "$DEPLOY_DIR/kafka/log4j2.yaml" "$KAFKA_LOG4J"; }; then
        cp "$DEPLOY_DIR/kafka/log4j2.yaml" "$KAFKA_LOG4J"
        KAFKA_CONFIG_CHANGED=1
    fi
    # Admin client settings for TopicCommand: fail in seconds, not the default
    # 60 s, so a broker that is still starting is simply polled again.
    cat >"$ADMIN_PROPS" <<'EOF'
request.timeout.ms=5000
default.api.timeout.ms=10000
socket.connection.setup.timeout.ms=2000
socket.connection.setup.timeout.max.ms=4000
EOF
}

# Print the pid of the broker this script started, if it is alive.
kafka_pid() {
    local pid
    [[ -f $KAFKA_PIDFILE ]] || return 1
    pid=$(<"$KAFKA_PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    pid_alive "$pid" || return 1
    # Guard against pid reuse after a reboot.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
    printf '%s' "$pid"
}

# A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (what
# `kafka-storage.sh random-uuid` prints); one that starts with '-' would be
# taken for an option, Kafka itself never generates those either.
new_cluster_id() {
    local id
    while :; do
        id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
        [[ $id == -* ]] || break
    done
    printf '%s' "$id"
}

kafka_start() {
    find_java
    if [[ ! -f $KAFKA_DATA/meta.properties ]]; then
        local cid
        cid=$(new_cluster_id)
        log "formatting KRaft storage $KAFKA_DATA (cluster id $cid)"
        kafka_tool kafka.tools.StorageTool format --ignore-formatted -t "$cid" -c "$KAFKA_PROPS" >&2 ||
            die "kafka-storage format failed"
    fi
    log "starting Kafka $KAFKA_VERSION broker+controller on $KAFKA_BOOTSTRAP_OUT (log: $KAFKA_LOG, JVM output: $KAFKA_OUT)"
    rm -f "$KAFKA_PIDFILE"
    # setsid: own session and process group, so the broker outlives this script
    # and whatever runs it (CI step, a shell that gets killed). The inner shell
    # records its own pid and then exec's java, so the pid file is the JVM's;
    # it also closes inherited descriptors (see without_extra_fds).
    # JVM flags as in Kafka's kafka-server-start.sh / kafka-run-class.sh.
    # shellcheck disable=SC2016 # expanded by the inner bash
    setsid bash -c "$CLOSE_EXTRA_FDS"'; echo $$ >"$0"; exec "$@"' "$KAFKA_PIDFILE" \
        "$JAVA" "-Xms$KAFKA_HEAP" "-Xmx$KAFKA_HEAP" -server \
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true \
        "-Dkafka.logs.dir=$LOG_DIR" "-Dlog4j2.configurationFile=$KAFKA_LOG4J" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
        >>"$KAFKA_OUT" 2>&1 </dev/null &
    local waited=0
    while [[ ! -s $KAFKA_PIDFILE ]] && ((waited++ < 50)); do sleep 0.1; done
    [[ -s $KAFKA_PIDFILE ]] || die "Kafka did not start (see $KAFKA_OUT)"
}

kafka_fail() {
    log "last lines of $KAFKA_LOG:"
    tail -n 30 "$KAFKA_LOG" >&2 2>/dev/null || true
    if [[ -s $KAFKA_OUT ]]; then
        log "last lines of $KAFKA_OUT:"
        tail -n 15 "$KAFKA_OUT" >&2 || true
    fi
    die "$*"
}

TOPIC_REGEX='telemetry\.v1|alerts\.v1|telemetry\.v1\.dlq'
TOPICS_DESCRIBED=""

# One TopicCommand run: proves the broker serves metadata requests and lists our
# topics with their partition counts ("name count" lines in TOPICS_DESCRIBED).
kafka_describe_topics() {
    local out
    out=$(kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_OUT" \
        --command-config "$ADMIN_PROPS" --describe --if-exists --topic "$TOPIC_REGEX" 2>>"$LOG_DIR/tools.log") || return 1
    TOPICS_DESCRIBED=$(awk '/^Topic:/ { for (i = 1; i < NF; i++) if ($i == "PartitionCount:") print $2, $(i + 1) }' <<<"$out")
}

kafka_wait_ready() {
    local pid=${1:-} deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    log "waiting for Kafka on $KAFKA_BOOTSTRAP_OUT (up to ${KAFKA_START_TIMEOUT}s)"
    while :; do
        if [[ -n $pid ]] && ! pid_alive "$pid"; then
            rm -f "$KAFKA_PIDFILE"
            kafka_fail "the Kafka process (pid $pid) exited during startup"
        fi
        if port_open "$KAFKA_HOST" "$KAFKA_PORT" && kafka_describe_topics; then
            return 0
        fi
        ((SECONDS < deadline)) || kafka_fail "Kafka did not answer a metadata request on $KAFKA_BOOTSTRAP_OUT within ${KAFKA_START_TIMEOUT}s (tool errors: $LOG_DIR/tools.log)"
        sleep 1
    done
}

kafka_ensure_topics() {
    local spec name want have
    for spec in "telemetry.v1:$TELEMETRY_PARTITIONS" "alerts.v1:$ALERTS_PARTITIONS" "telemetry.v1.dlq:$DLQ_PARTITIONS"; do
        name=${spec%%:*}
        want=${spec##*:}
        have=$(awk -v t="$name" '$1 == t { print $2 }' <<<"$TOPICS_DESCRIBED")
        if [[ -z $have ]]; then
            log "creating topic $name ($want partitions)"
            kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_OUT" \
                --command-config "$ADMIN_PROPS" --create --if-not-exists --topic "$name" \
                --partitions "$want" --replication-factor 1 >&2 ||
                die "could not create topic $name (see $LOG_DIR/tools.log and $KAFKA_LOG)"
        elif [[ $have != "$want" ]]; then
            # Not changed automatically: adding partitions re-maps keys (per-device
            # order), and Kafka cannot remove partitions at all.
            log "WARNING: topic $name has $have partitions, $want wanted; left as is (delete $KAFKA_DATA via 'down' + rm to recreate)"
        else
            log "topic $name exists ($have partitions)"
        fi
    done
}

kafka_up() {
    kafka_fetch
    local pid=""
    kafka_render_config
    if pid=$(kafka_pid); then
        if [[ $KAFKA_CONFIG_CHANGED -eq 1 ]]; then
            log "Kafka configuration changed: restarting the broker (pid $pid)"
            kafka_stop
            pid=""
        else
            log "Kafka already running (pid $pid)"
        fi
    fi
    find_java
    if [[ -z $pid ]]; then
        if port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
            # Someone else's broker (a container, another checkout's deps.sh)?
            if kafka_describe_topics; then
                log "a Kafka broker not started by this script answers on $KAFKA_BOOTSTRAP_OUT: using it"
                kafka_ensure_topics
                return 0
            fi
            die "port $KAFKA_PORT is in use but does not answer as Kafka"
        fi
        kafka_start
        pid=$(<"$KAFKA_PIDFILE")
    fi
    kafka_wait_ready "$pid"
    kafka_ensure_topics
    log "Kafka $KAFKA_VERSION ready on $KAFKA_BOOTSTRAP_OUT (pid $pid; data $KAFKA_DATA; log $KAFKA_LOG)"
}

kafka_stop() {
    local pid deadline
    if ! pid=$(kafka_pid); then
        log "Kafka not running (no live pid in $KAFKA_PIDFILE)"
        rm -f "$KAFKA_PIDFILE"
        return 0
    fi
    log "stopping Kafka (pid $pid): SIGTERM, up to ${KAFKA_STOP_TIMEOUT}s for a controlled shutdown"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + KAFKA_STOP_TIMEOUT))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
    if pid_alive "$pid"; then
        log "Kafka still running after ${KAFKA_STOP_TIMEOUT}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while pid_alive "$pid"; do sleep 0.2; done
    fi
    rm -f "$KAFKA_PIDFILE"
    log "Kafka stopped"
}

# ---------------------------------------------------------------------------
# Schema registry (Apicurio Registry 2.4, Confluent-compatible API)
# ---------------------------------------------------------------------------
# Built once from Maven Central artifacts (deploy/registry/pom.xml: no runnable jar is
# published) into $REGISTRY_DIR; rebuilt only when the pom changes. Runs on the JDK 17 with
# H2 in memory (schemas are lost on restart: fine for development and CI) and BACKWARD as the
# global compatibility rule, as fleetstream's schema-evolution rules require.
registry_fetch() {
    local want marker="$REGISTRY_DIR/.fleetstream-complete"
    want=$(sha256sum "$REGISTRY_POM" | cut -d' ' -f1)
    if [[ -f $marker && $(<"$marker") == "$want" && -f $REGISTRY_DIR/registry-1-runner.jar ]]; then
        return 0
    fi
    find_java
    command -v mvn >/dev/null 2>&1 || apt_install maven
    local build="$CACHE/apicurio-build.$$" mvnlog="$CACHE/mvn-apicurio-registry.log"
    rm -rf "$build"
    mkdir -p "$build"
    cp "$REGISTRY_POM" "$build/pom.xml"
    log "building Apicurio Registry from Maven Central into $REGISTRY_DIR (once, ~2 min; log: $mvnlog)"
    if ! (cd "$build" && JAVA_HOME=$(dirname "$(dirname "$(readlink -f "$JAVA")")") \
        mvn -B -ntp -Dstyle.color=never -Dmaven.repo.local="$CACHE/m2" package) >"$mvnlog" 2>&1; then
        tail -n 40 "$mvnlog" >&2
        rm -rf "$build"
        die "mvn could not build Apicurio Registry (full log: $mvnlog)"
    fi
    [[ -f $build/target/registry-1-runner.jar && -d $build/target/lib ]] ||
        die "mvn finished but target/registry-1-runner.jar or target/lib is missing (log: $mvnlog)"
    rm -rf "$REGISTRY_DIR.tmp"
    mkdir -p "$REGISTRY_DIR.tmp"
    mv "$build/target/registry-1-runner.jar" "$build/target/lib" "$REGISTRY_DIR.tmp/"
    printf '%s\n' "$want" >"$REGISTRY_DIR.tmp/.fleetstream-complete"
    rm -rf "$REGISTRY_DIR" "$build"
    mv "$REGISTRY_DIR.tmp" "$REGISTRY_DIR"
    log "Apicurio Registry: $(find "$REGISTRY_DIR/lib" -name '*.jar' | wc -l) jars in $REGISTRY_DIR"
}

registry_pid() {
    local pid
    [[ -f $REGISTRY_PIDFILE ]] || return 1
    pid=$(<"$REGISTRY_PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    pid_alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'registry-1-runner\.jar' || return 1
    printf '%s' "$pid"
}

# Whether the ccompat API answers (the subjects list, HTTP 200).
registry_answers() {
    command -v curl >/dev/null 2>&1 || apt_install curl
    curl -fs -o /dev/null -m 3 "$REGISTRY_URL_OUT/subjects"
}

registry_up() {
    registry_fetch
    local pid="" log_file="$LOG_DIR/registry.log"
    if pid=$(registry_pid); then
        log "schema registry already running (pid $pid)"
    else
        if port_open "$REGISTRY_HOST" "$REGISTRY_PORT"; then
            registry_answers || die "port $REGISTRY_PORT is in use but does not answer as a schema registry"
            log "a schema registry not started by this script answers on $REGISTRY_URL_OUT: using it"
            return 0
        fi
        find_java
        mkdir -p "$STATE" "$LOG_DIR"
        log "starting Apicurio Registry on $REGISTRY_URL_OUT (log: $log_file)"
        rm -f "$REGISTRY_PIDFILE"
        # Detached like the broker (see kafka_start); run from its directory (the runner jar
        # finds lib/ next to itself; nothing is written there).
        # shellcheck disable=SC2016 # expanded by the inner bash
        setsid bash -c "$CLOSE_EXTRA_FDS"'; echo $$ >"$0"; cd "$1" && shift && exec "$@"' \
            "$REGISTRY_PIDFILE" "$REGISTRY_DIR" \
            "$JAVA" -Xms64m "-Xmx$REGISTRY_HEAP" -XX:+UseSerialGC -Djava.awt.headless=true \
            "-Dquarkus.http.port=$REGISTRY_PORT" "-Dquarkus.http.host=$REGISTRY_HOST" \
            -Dregistry.rules.global.compatibility=BACKWARD \
            -jar registry-1-runner.jar >>"$log_file" 2>&1 </dev/null &
        local waited=0
        while [[ ! -s $REGISTRY_PIDFILE ]] && ((waited++ < 50)); do sleep 0.1; done
        pid=$(<"$REGISTRY_PIDFILE")
    fi
    local deadline=$((SECONDS + REGISTRY_START_TIMEOUT))
    until registry_answers; do
        if ! pid_alive "$pid"; then
            tail -n 30 "$log_file" >&2 || true
            die "the schema registry (pid $pid) exited during startup (log: $log_file)"
        fi
        ((SECONDS < deadline)) || die "the schema registry did not answer on $REGISTRY_URL_OUT within ${REGISTRY_START_TIMEOUT}s (log: $log_file)"
        sleep 0.5
    done
    log "schema registry ready on $REGISTRY_URL_OUT (pid $pid; compatibility BACKWARD; in-memory storage)"
}

registry_stop() {
    local pid
    if ! pid=$(registry_pid); then
        rm -f "$REGISTRY_PIDFILE"
        return 0
    fi
    log "stopping the schema registry (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.3; done
    pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$REGISTRY_PIDFILE"
}

# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------
# Serialise concurrent invocations (parallel CI steps, two terminals): re-run
# this script under flock(1). -o closes the lock's descriptor before running us,
# so the daemons started below (postgres, the broker) do not inherit and hold it.
# Independent Avro/Kafka clients for interoperability tests (fastavro, confluent-kafka from
# PyPI), in a virtualenv under the cache; reinstalled only when the pinned versions change.
python_clients_up() {
    # The [avro,schemaregistry] extras: AvroSerializer/AvroDeserializer and the registry client
    # (httpx, authlib, cachetools, certifi, ...) for the schema-registry tests.
    local want="fastavro==$FASTAVRO_VERSION confluent-kafka[avro,schemaregistry]==$CONFLUENT_KAFKA_VERSION"
    [[ -x $PYTHON_CLIENTS/bin/python && $(cat "$PYTHON_CLIENTS/.pinned" 2>/dev/null) == "$want" ]] && return 0
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    log "installing Python clients into $PYTHON_CLIENTS: $want"
    python3 -m venv "$PYTHON_CLIENTS" >&2 || { apt_install python3-venv && python3 -m venv "$PYTHON_CLIENTS" >&2; }
    # shellcheck disable=SC2086 # $want is several requirement words
    "$PYTHON_CLIENTS/bin/pip" install -q --disable-pip-version-check $want >&2 \
        || die "pip install $want failed"
    printf '%s' "$want" >"$PYTHON_CLIENTS/.pinned"
}

# Headless Chromium for query-api's dashboard test (Debian's package; skipped when present).
browser_up() {
    command -v chromium >/dev/null 2>&1 && return 0
    apt_install chromium
}

# Debian's mosquitto-clients (mosquitto_pub) for ingest-producer's third-party MQTT client
# test (skipped when present).
mqtt_clients_up() {
    command -v mosquitto_pub >/dev/null 2>&1 && return 0
    apt_install mosquitto-clients
}

# Telegraf with only the plugins the line-protocol tests use, built once from the Go module
# proxy into the cache (a few minutes on 2 cores; the module cache is kept beside it).
telegraf_up() {
    local dir stamp tmp
    dir=$(dirname "$TELEGRAF_BIN")
    stamp="$dir/build-tags"
    [[ -x $TELEGRAF_BIN && $(cat "$stamp" 2>/dev/null) == "$TELEGRAF_TAGS" ]] && return 0
    command -v go >/dev/null 2>&1 || die "go is needed to build Telegraf $TELEGRAF_VERSION"
    tmp="$dir.tmp.$$"
    log "building Telegraf $TELEGRAF_VERSION (once; log $CACHE/telegraf-$TELEGRAF_VERSION.log)"
    mkdir -p "$tmp"
    if ! GOBIN="$tmp" GOMODCACHE="$CACHE/gomod" GOFLAGS=-buildvcs=false \
        go install -tags "$TELEGRAF_TAGS" \
        "github.com/influxdata/telegraf/cmd/telegraf@$TELEGRAF_VERSION" \
        >"$CACHE/telegraf-$TELEGRAF_VERSION.log" 2>&1; then
        rm -rf "$tmp"
        die "building Telegraf failed: $(tail -5 "$CACHE/telegraf-$TELEGRAF_VERSION.log")"
    fi
    printf '%s\n' "$TELEGRAF_TAGS" >"$tmp/build-tags"
    mkdir -p "$(dirname "$dir")"
    rm -rf "$dir"
    mv "$tmp" "$dir"
}

take_lock() {
    if [[ -z ${FLEETSTREAM_DEPS_LOCKED:-} ]]; then
        mkdir -p "$STATE"
        FLEETSTREAM_DEPS_LOCKED=1 exec flock -o -w 600 "$STATE/.deps.lock" bash "${BASH_SOURCE[0]}" "$@"
    fi
}

cmd_up() {
    need_root up
    take_lock up
    local t0=$SECONDS
    pg_up
    kafka_up
    registry_up
    python_clients_up
    browser_up
    mqtt_clients_up
    telegraf_up
    log "all up in $((SECONDS - t0))s. Logs: $(pg_logfile), $KAFKA_LOG. Use:"
    print_env | sed 's/^/[deps]   /' >&2
    print_env
}

cmd_down() {
    need_root down
    take_lock down
    registry_stop
    kafka_stop
    pg_down
}

cmd_status() {
    local rc=0 ver pid
    ver=$(find_pg_version)
    if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2; then
        echo "postgres: up (PostgreSQL ${ver:-?} on $PG_HOST:$PG_PORT, log /var/log/postgresql/postgresql-${ver:-?}-$PG_CLUSTER.log)"
    else
        echo "postgres: down ($PG_HOST:$PG_PORT not accepting connections)"
        rc=1
    fi
    if pid=$(kafka_pid) && port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
        echo "kafka:    up (Kafka $KAFKA_VERSION, pid $pid, $KAFKA_BOOTSTRAP_OUT, log $KAFKA_LOG)"
    elif [[ -n $pid ]]; then
        echo "kafka:    starting (pid $pid, $KAFKA_BOOTSTRAP_OUT not answering yet)"
        rc=1
    elif port_open "$KAFKA_HOST" "$KAFKA_PORT"; then
        echo "kafka:    up ($KAFKA_BOOTSTRAP_OUT answers; not started by deps.sh)"
    else
        echo "kafka:    down"
        rc=1
    fi
    if pid=$(registry_pid) && port_open "$REGISTRY_HOST" "$REGISTRY_PORT"; then
        echo "registry: up (Apicurio, pid $pid, $REGISTRY_URL_OUT, log $LOG_DIR/registry.log)"
    elif port_open "$REGISTRY_HOST" "$REGISTRY_PORT"; then
        echo "registry: up ($REGISTRY_URL_OUT answers; not started by deps.sh)"
    else
        echo "registry: down"
        rc=1
    fi
    return $rc
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 ;;
esac
