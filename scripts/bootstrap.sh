# shellcheck shell=bash
# Sourced by scripts/demo and scripts/test: installs what qsnap needs on a fresh Debian/Ubuntu
# machine (system packages via apt-get when missing, Python deps in ./.venv), idempotently.

QSNAP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QSNAP_VENV:-$QSNAP_ROOT/.venv}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# apt_install PKG...: install the packages that are missing (root, else sudo, else explain).
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "qsnap needs these packages: ${missing[*]}" >&2
            echo "run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -q >/dev/null
        "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

# ensure_apt_index: the end-to-end tests `apt-get download` a Debian kernel and busybox, which
# needs the package index (a fresh container often has none).
ensure_apt_index() {
    apt-cache show linux-image-amd64 >/dev/null 2>&1 && return 0
    local sudo=()
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo=(sudo)
    log "apt-get update (the test guest is built from Debian packages)"
    "${sudo[@]}" apt-get update -q >/dev/null || true
}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# ensure_venv EXTRAS: a venv with qsnap installed (editable), reinstalled when pyproject changes.
ensure_venv() {
    local extras="$1" py stamp
    if ! py="$(find_python)"; then
        apt_install python3 python3-venv
        if ! py="$(find_python)"; then
            # Ubuntu 22.04 ships 3.10 as python3 but packages python3.11 too.
            apt_install python3.11 python3.11-venv || true
            py="$(find_python)" || { echo "qsnap needs Python >= 3.11" >&2; exit 1; }
        fi
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        if ! "$py" -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            apt_install python3-venv
            "$py" -m venv "$VENV"
        fi
    fi
    stamp="$VENV/.qsnap-installed-$extras-$(sha256sum "$QSNAP_ROOT/pyproject.toml" | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        log "installing Python dependencies into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q -e "$QSNAP_ROOT[$extras]"
        rm -f "$VENV"/.qsnap-installed-*
        touch "$stamp"
    fi
    # Byte-compile qsnap so `qsnap list` starts fast even where PYTHONDONTWRITEBYTECODE is set.
    "$VENV/bin/python" -m compileall -q "$QSNAP_ROOT/src" >/dev/null 2>&1 || true
}
