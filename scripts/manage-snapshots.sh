#!/usr/bin/env bash
# The guide's scripts/manage-snapshots.sh, now backed by qsnap: same commands, same messages.
# Uses the project's venv when present, else a manage-snapshots on PATH.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$here/.venv/bin/manage-snapshots" ]; then
    exec "$here/.venv/bin/manage-snapshots" "$@"
fi
exec manage-snapshots "$@"
