# Sourced by scripts/test, scripts/e2e and scripts/demo: installs what they need, once.
#
#   prepare_packages PKG...   Debian packages, with apt-get, when a command they provide is
#                             missing (needs root, as the servers run as their own users)
#   prepare_python            a virtual environment in .venv with tests/e2e/requirements.txt,
#                             made on first use and again when the requirements change; its
#                             bin/ goes first on PATH
#
# Nothing is installed system-wide with pip, and nothing outside the repository but the
# Debian packages.

# Which command tells that a package is installed.
_command_of() {
    case "$1" in
        prosody) echo prosody ;;
        ejabberd) echo ejabberdctl ;;
        util-linux) echo setpriv ;;
        postgresql) echo pg_ctlcluster ;;  # the server, not only psql (postgresql-common)
        g++) echo c++ ;;
        *) echo "$1" ;;
    esac
}

_apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "prepare: $* missing; install them as root (apt-get install $*) or run as root" >&2
        exit 1
    fi
    echo "prepare: installing $* with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${_XTLS_APT_UPDATED:-}" ]; then
        apt-get update -q >&2
        _XTLS_APT_UPDATED=1
    fi
    apt-get install -y -q --no-install-recommends "$@" >&2
}

prepare_packages() {
    local missing=()
    for pkg in "$@"; do
        command -v "$(_command_of "$pkg")" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        _apt_install "${missing[@]}"
    fi
}

prepare_python() {
    local root venv stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    venv="$root/.venv"
    stamp="$venv/.requirements.sha256"
    want="$(sha256sum "$root/tests/e2e/requirements.txt" | cut -d' ' -f1)"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # Debian's python3 has no venv module (nor pip) until python3-venv is installed.
        if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
            _apt_install python3-venv
        fi
        echo "prepare: creating $venv with tests/e2e/requirements.txt (first run: about a minute)" >&2
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            -r "$root/tests/e2e/requirements.txt" >&2
        echo "$want" >"$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}
