#!/bin/sh
# Container entrypoint. It execs the command, so the server runs as PID 1 and gets
# SIGTERM from `docker stop` directly (uvicorn then drains and exits).
#
#   (no arguments)           vaebm serve
#   serve | calibrate ...    a vaebm subcommand, given bare
#   vaebm calibrate ...      any program on PATH, as is
set -eu
if [ "$#" -eq 0 ]; then
    set -- vaebm serve
elif [ "${1#-}" != "$1" ] || ! command -v "$1" >/dev/null 2>&1; then
    set -- vaebm "$@"
fi
exec "$@"
