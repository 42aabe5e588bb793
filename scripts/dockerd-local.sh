#!/usr/bin/env bash
# A private Docker engine for machines without a system one (no systemd, no /var/run/docker.sock).
#
#   scripts/dockerd-local.sh start    start dockerd (no-op when it already runs); prints the export line
#   scripts/dockerd-local.sh stop     remove its containers, stop dockerd by PID, unmount what it left
#   scripts/dockerd-local.sh status   say whether it runs (exit 0) or not (exit 3)
#
# `eval "$(scripts/dockerd-local.sh start)"` sets DOCKER_HOST in the calling shell: the export line is
# the only thing written to stdout; messages go to stderr.
# It assumes `dockerd` is on PATH (Debian: apt-get install docker.io). The engine's data root, exec
# root, pidfile, log and socket live under $HARNESS_DOCKER_DIR (default /var/tmp/medsam-harness-docker).
# dockerd runs with --iptables=false --bridge=none: it leaves the host's firewall alone, and containers
# get no network but loopback (the challenge runs inference offline).
set -euo pipefail

DIR=${HARNESS_DOCKER_DIR:-/var/tmp/medsam-harness-docker}
DIR=${DIR%/}
SOCK=$DIR/docker.sock
PIDFILE=$DIR/dockerd.pid
LOG=$DIR/dockerd.log
HOST=unix://$SOCK
WAIT_S=${HARNESS_DOCKER_WAIT_S:-60}

say() { echo "dockerd-local: $*" >&2; }
die() { say "$*"; exit 1; }

# The PID in the pidfile, when that process is a live dockerd.
engine_pid() {
  [ -s "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
  # a zombie (killed, not yet reaped by its new parent) keeps its name but serves nothing
  [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

# Does the engine's API answer on our socket?
api_ready() {
  [ -S "$SOCK" ] || return 1
  if command -v curl >/dev/null 2>&1; then
    [ "$(curl -s --max-time 3 --unix-socket "$SOCK" http://localhost/_ping 2>/dev/null)" = OK ]
  else
    docker -H "$HOST" version >/dev/null 2>&1
  fi
}

server_version() {
  if command -v curl >/dev/null 2>&1; then
    curl -s --max-time 3 --unix-socket "$SOCK" http://localhost/version \
      | sed -n 's/.*"Version":"\([^"]*\)".*"ApiVersion".*/\1/p' | head -n1
  else
    docker -H "$HOST" version --format '{{.Server.Version}}' 2>/dev/null
  fi
}

# Unmount what dockerd leaves mounted under $DIR (its netns mount; overlays of containers it lost).
unmount_leftovers() {
  local mounts
  mounts=$(awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
  local m
  for m in $mounts; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
  done
}

# dockerd's own containerd writes its PID to $DIR/exec/containerd/containerd.pid. When that file outlives
# the engine (a reboot, a SIGKILL) and its PID now belongs to another process, a new dockerd believes
# containerd "is still running", waits for a socket that never appears and gives up ("timeout waiting
# for containerd to start"). Before a start: stop a containerd that really is ours and has lost its
# dockerd, and remove the stale PID file and sockets.
clear_stale_containerd() {
  local cdir=$DIR/exec/containerd pid
  local pidfile=$cdir/containerd.pid
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = containerd ] \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$cdir/"; then
      say "stopping containerd (PID $pid) left running by an earlier dockerd"
      kill -TERM "$pid" 2>/dev/null || true
      local waited=0
      while [ -d "/proc/$pid" ] && [ "$waited" -lt 50 ]; do sleep 0.2; waited=$((waited + 1)); done
      [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    elif [ -n "$pid" ]; then
      say "removing a stale containerd PID file ($pidfile: PID $pid is not this engine's containerd)"
    fi
  fi
  rm -f "$pidfile" "$cdir/containerd.sock" "$cdir/containerd.sock.ttrpc" "$cdir/containerd-debug.sock"
}

cmd_start() {
  if pid=$(engine_pid); then
    local waited=0
    until api_ready; do
      [ "$waited" -ge "$((WAIT_S * 5))" ] && die "dockerd (PID $pid) runs but its API at $SOCK does not answer; see $LOG"
      sleep 0.2; waited=$((waited + 1))
    done
    say "already running (PID $pid, $SOCK)"
    echo "export DOCKER_HOST=$HOST"
    return 0
  fi
  if api_ready; then  # an engine we did not start answers on our socket: use it, do not manage it
    say "an engine already answers on $SOCK (not started by this script: no live PID in $PIDFILE)"
    echo "export DOCKER_HOST=$HOST"
    return 0
  fi
  command -v dockerd >/dev/null 2>&1 \
    || die "dockerd not found on PATH; install it first (Debian/Ubuntu: apt-get install --no-install-recommends docker.io)"
  # containerd's sockets go under the exec root; a unix socket path must stay under 108 bytes.
  [ "${#SOCK}" -lt 90 ] || die "HARNESS_DOCKER_DIR=$DIR is too long for unix socket paths (keep it under ~80 characters)"
  mkdir -p "$DIR"
  rm -f "$PIDFILE" "$SOCK"
  clear_stale_containerd
  unmount_leftovers
  say "starting dockerd (state in $DIR, log $LOG)"
  # setsid: the engine outlives this shell and its terminal; stdin closed, output to the log.
  setsid dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$PIDFILE" \
    -H "$HOST" --iptables=false --bridge=none </dev/null >>"$LOG" 2>&1 &
  local launched=$! waited=0
  until api_ready; do
    if ! kill -0 "$launched" 2>/dev/null; then
      say "dockerd exited during start-up; the end of $LOG:"
      tail -n 20 "$LOG" >&2
      exit 1
    fi
    [ "$waited" -ge "$((WAIT_S * 5))" ] && die "dockerd (PID $launched) started but its API did not answer within ${WAIT_S}s; see $LOG"
    sleep 0.2; waited=$((waited + 1))
  done
  say "running (PID $(engine_pid || echo "$launched"), dockerd $(server_version), $SOCK)"
  echo "export DOCKER_HOST=$HOST"
}

cmd_stop() {
  local pid
  if ! pid=$(engine_pid); then
    say "not running (no live dockerd PID in $PIDFILE)"
    rm -f "$PIDFILE"
    clear_stale_containerd
    unmount_leftovers
    return 0
  fi
  if api_ready && command -v docker >/dev/null 2>&1; then
    local ids
    ids=$(docker -H "$HOST" ps -aq 2>/dev/null || true)
    if [ -n "$ids" ]; then
      say "removing $(echo "$ids" | wc -l) container(s)"
      # shellcheck disable=SC2086
      docker -H "$HOST" rm -f $ids >/dev/null 2>&1 || say "could not remove every container"
    fi
  fi
  say "stopping dockerd (PID $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local waited=0
  while engine_pid >/dev/null; do
    if [ "$waited" -ge "$((WAIT_S * 5))" ]; then
      say "dockerd (PID $pid) still runs after ${WAIT_S}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.2; waited=$((waited + 1))
  done
  rm -f "$PIDFILE"
  unmount_leftovers
  say "stopped"
}

cmd_status() {
  local pid
  if pid=$(engine_pid) && api_ready; then
    say "running (PID $pid, dockerd $(server_version), $SOCK)"
    echo "export DOCKER_HOST=$HOST"
    return 0
  fi
  if pid=$(engine_pid); then
    say "dockerd (PID $pid) runs but its API at $SOCK does not answer"
    return 3
  fi
  if api_ready; then
    say "an engine answers on $SOCK (not started by this script)"
    echo "export DOCKER_HOST=$HOST"
    return 0
  fi
  say "not running"
  return 3
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (state dir: \$HARNESS_DOCKER_DIR, default /var/tmp/medsam-harness-docker)" >&2; exit 2 ;;
esac
