#!/usr/bin/env bash
# Team mode on one machine: PostgreSQL 15 and a one-node Slurm 22.05 from Debian's packages, started
# directly (no systemd), everything on 127.0.0.1. The team tests and a user's first try use it; a lab
# points polyrot at its own PostgreSQL and Slurm instead.
#
#   scripts/team-services.sh up       install what is missing (apt-get), start PostgreSQL, munge, Slurm
#   scripts/team-services.sh down     stop them (state stays in the state directory)
#   scripts/team-services.sh status   exit 0 only if PostgreSQL answers and Slurm has an idle node
#
# Runs as root (slurmd and munge need it; PostgreSQL itself runs as the `postgres` user). State lives
# in $POLYROT_SERVICES_DIR (default /tmp/polyrot-services); `up` writes services.env there, which
# names the database and the password file for clients. With MLFLOW_AUTH_ADMIN_PASSWORD set, `up`
# also initialises and starts the team tracking server (`polyrot server`) in $DIR/server.
set -euo pipefail

DIR=${POLYROT_SERVICES_DIR:-/tmp/polyrot-services}
PG_PORT=${POLYROT_PG_PORT:-55432}
SERVER_PORT=${POLYROT_SERVER_PORT:-5000}
PG_BIN=/usr/lib/postgresql/15/bin
REPO=$(cd "$(dirname "$0")/.." && pwd)
SLURM_CONF_PATH=/etc/slurm/slurm.conf
MARK="# written by polyrot scripts/team-services.sh"

install_packages() {
  local missing=()
  [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

pg_up() {
  mkdir -p "$DIR"
  chmod 755 "$DIR"
  if [ ! -f "$DIR/pgpass" ]; then
    # The database password is generated here and only ever read from this file (libpq's
    # PGPASSFILE): it is in no URI, so no log or run parameter can carry it.
    (umask 077; printf '127.0.0.1:%s:*:polyrot:%s\n' "$PG_PORT" "$(head -c 18 /dev/urandom | base64 | tr -d '/+=')" > "$DIR/pgpass")
  fi
  if [ ! -f "$DIR/pg/PG_VERSION" ]; then
    install -d -o postgres -g postgres -m 700 "$DIR/pg" "$DIR/pg-socket"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$DIR/pg" -A peer --auth-host=scram-sha-256 -U postgres >/dev/null
    cat >> "$DIR/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$DIR/pg-socket'
EOF
  fi
  install -d -o postgres -g postgres -m 700 "$DIR/pg-socket"
  if ! runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg/postgres.log" -w start >/dev/null
  fi
  local password
  password=$(cut -d: -f5 "$DIR/pgpass")
  # One login role for polyrot; CREATEDB so that each test session gets a database of its own.
  runuser -u postgres -- psql -qAt -h "$DIR/pg-socket" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<EOF
SELECT 'CREATE ROLE polyrot LOGIN CREATEDB' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'polyrot')\gexec
ALTER ROLE polyrot PASSWORD '$password';
SELECT 'CREATE DATABASE polyrot OWNER polyrot' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'polyrot')\gexec
SELECT 'CREATE DATABASE polyrot_auth OWNER polyrot' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'polyrot_auth')\gexec
EOF
}

slurm_conf() {
  local mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat <<EOF
$MARK
ClusterName=polyrot
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Without systemd or cgroups: plain process tracking, no task containment, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
KillWait=5
# Batch scripts of finished jobs are not kept: a dependency on a purged job counts as satisfied, so
# keep finished jobs known for an hour (reproduce --no-wait continues a graph within that).
MinJobAge=3600
StateSaveLocation=$DIR/slurm/state
SlurmdSpoolDir=$DIR/slurm/spool
SlurmctldPidFile=$DIR/slurm/slurmctld.pid
SlurmdPidFile=$DIR/slurm/slurmd.pid
SlurmctldLogFile=$DIR/slurm/slurmctld.log
SlurmdLogFile=$DIR/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

slurm_up() {
  mkdir -p "$DIR/slurm/state" "$DIR/slurm/spool"
  if [ -f "$SLURM_CONF_PATH" ] && ! grep -qF "$MARK" "$SLURM_CONF_PATH"; then
    echo "team-services: $SLURM_CONF_PATH exists and is not ours; leaving Slurm alone" >&2
    return 1
  fi
  slurm_conf > "$SLURM_CONF_PATH"
  install -d -o munge -g munge -m 755 /run/munge
  if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
  fi
  pgrep -F "$DIR/slurm/slurmctld.pid" >/dev/null 2>&1 || /usr/sbin/slurmctld
  pgrep -F "$DIR/slurm/slurmd.pid" >/dev/null 2>&1 || /usr/sbin/slurmd -N localhost
  local i
  for i in $(seq 1 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -q idle; then return 0; fi
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  echo "team-services: the Slurm node did not become idle; see $DIR/slurm/*.log" >&2
  return 1
}

write_env() {
  cat > "$DIR/services.env" <<EOF
# Written by scripts/team-services.sh up: what a client needs to reach these services.
export PGPASSFILE=$DIR/pgpass
export POLYROT_TEAM_DATABASE=postgresql+psycopg2://polyrot@127.0.0.1:$PG_PORT/polyrot
export POLYROT_TEAM_AUTH_DATABASE=postgresql+psycopg2://polyrot@127.0.0.1:$PG_PORT/polyrot_auth
export POLYROT_TEAM_PG=postgresql://polyrot@127.0.0.1:$PG_PORT
EOF
}

server_up() {
  [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || return 0
  # shellcheck disable=SC1091
  . "$DIR/services.env"
  local polyrot="$REPO/.venv/bin/polyrot"
  [ -f "$DIR/server/server.json" ] || "$polyrot" server init --dir "$DIR/server" \
      --database "$POLYROT_TEAM_DATABASE" --auth-database "$POLYROT_TEAM_AUTH_DATABASE" --port "$SERVER_PORT"
  "$polyrot" server status --dir "$DIR/server" >/dev/null 2>&1 || "$polyrot" server start --dir "$DIR/server"
}

down() {
  [ -x "$REPO/.venv/bin/polyrot" ] && [ -f "$DIR/server/server.json" ] && "$REPO/.venv/bin/polyrot" server stop --dir "$DIR/server" || true
  [ -f "$DIR/slurm/slurmd.pid" ] && pkill -F "$DIR/slurm/slurmd.pid" 2>/dev/null || true
  [ -f "$DIR/slurm/slurmctld.pid" ] && pkill -F "$DIR/slurm/slurmctld.pid" 2>/dev/null || true
  [ -f "$DIR/pg/PG_VERSION" ] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null 2>&1 || true
}

status() {
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1 || { echo "PostgreSQL: down"; return 1; }
  echo "PostgreSQL: up on 127.0.0.1:$PG_PORT"
  sinfo -h -N -o '%T' 2>/dev/null | grep -q idle || { echo "Slurm: no idle node"; return 1; }
  echo "Slurm: node localhost idle"
}

case "${1:-}" in
  up)
    start=$(date +%s.%N)
    install_packages
    pg_up
    slurm_up
    write_env
    server_up
    echo "services up in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $start}") s; source $DIR/services.env"
    ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
