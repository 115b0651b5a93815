#!/usr/bin/env bash
# Licensed under a 3-clause BSD style license - see LICENSE.rst
#
# Set up everything desitransfer needs on a Debian machine, then run the
# demonstration or the tests:
#
#   bash quickstart.sh demo     # the daemon's job, once, on a simulated mountain
#   bash quickstart.sh test     # the whole test suite
#   bash quickstart.sh setup    # only install what is missing
#
# System programs are installed with apt-get (as root, or through sudo);
# Python packages go into a virtual environment, .venv (or $DESITRANSFER_VENV).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${DESITRANSFER_VENV:-$top/.venv}

die() { echo "quickstart.sh: $*" >&2; exit 1; }

system_packages() {
    local need=()
    command -v rsync >/dev/null || need+=(rsync)
    command -v ssh >/dev/null || need+=(openssh-client)
    [ -x /usr/sbin/sshd ] || need+=(openssh-server)
    command -v sha256sum >/dev/null || need+=(coreutils)
    command -v git >/dev/null || need+=(git)
    command -v pgrep >/dev/null || need+=(procps)
    command -v python3 >/dev/null || need+=(python3)
    # The unprivileged tests run the system's python3 as nobody.
    [ -x /usr/bin/python3 ] || need+=(python3)
    command -v setpriv >/dev/null || need+=(util-linux)
    python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
    if [ "${1:-}" = test ]; then
        command -v chromium >/dev/null || need+=(chromium)
    fi
    [ ${#need[@]} -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "missing ${need[*]}; install them as root: apt-get install ${need[*]}"
        sudo=(sudo)
    fi
    echo "quickstart.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

python_packages() {
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" || die "could not create a virtual environment in $venv"
    fi
    local stamp="$venv/.desitransfer-installed"
    if [ ! -f "$stamp" ] || [ "$top/setup.cfg" -nt "$stamp" ]; then
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e "$top[test,doc]"
        touch "$stamp"
    fi
    # The package is installed in place (-e): compile it once here, as
    # otherwise every command compiles it again when PYTHONDONTWRITEBYTECODE
    # is set (30 ms of each start; the tests start hundreds).
    "$venv/bin/python" -m compileall -q "$top/py" >/dev/null
}

case "${1:-}" in
    setup)
        system_packages test
        python_packages
        ;;
    demo)
        system_packages demo
        python_packages
        shift
        exec "$venv/bin/python" "$top/etc/demo.py" "$@"
        ;;
    test)
        system_packages test
        python_packages
        shift
        cd "$top"
        export PATH="$venv/bin:$PATH"
        # In parallel, then the tests that must run alone; exit status 5 is
        # "no test selected".  One worker more than the cores (at most six):
        # the tests wait on servers and subprocesses, so two cores run three
        # workers busier (2:07 for the parallel part, 2:47 with two, 2:10
        # with four).
        cores=$(nproc 2>/dev/null || echo 2)
        workers=$((cores + 1))
        [ "$workers" -gt 6 ] && workers=6
        code=0
        "$venv/bin/python" -m pytest -n "$workers" -m 'not alone' "$@" || code=$?
        [ "$code" -eq 5 ] && code=0
        [ "$code" -eq 0 ] || exit "$code"
        "$venv/bin/python" -m pytest -m alone "$@" || code=$?
        [ "$code" -eq 5 ] && code=0
        exit "$code"
        ;;
    *)
        echo "usage: bash quickstart.sh {demo|test|setup} [arguments]" >&2
        exit 2
        ;;
esac
