#!/bin/sh
# Entry point of the pagetrack image.
#
#   no arguments, or flags  -> pagetrackd --config "${PAGETRACK_CONFIG:-/etc/pagetrack/pagetrack.toml}" FLAGS
#                              (unless the flags name their own --config)
#   any other command       -> run it, e.g. `pagetrack --target pagetrackd:50051 watch demo`
#
# Token auth: if PAGETRACK_TOKENS_FILE is unset and a file exists at
# /run/secrets/pagetrack-tokens (a compose secret or a bind mount), the daemon uses it.
# Without tokens pagetrackd refuses to listen on 0.0.0.0 unless given --insecure, which is
# meant for trusted networks only.
set -eu

default_tokens=/run/secrets/pagetrack-tokens
if [ -z "${PAGETRACK_TOKENS_FILE:-}" ]; then
    unset PAGETRACK_TOKENS_FILE
    if [ -f "$default_tokens" ]; then
        export PAGETRACK_TOKENS_FILE="$default_tokens"
    fi
fi

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi
for arg in "$@"; do
    case "$arg" in
        --config | --config=*) exec pagetrackd "$@" ;;
    esac
done
exec pagetrackd --config "${PAGETRACK_CONFIG:-/etc/pagetrack/pagetrack.toml}" "$@"
