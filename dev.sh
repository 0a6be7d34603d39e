#!/usr/bin/env bash
# labmetal on a fresh Debian machine:
#   ./dev.sh demo   set up, then run the main job (a simulated room provisioned end to end)
#   ./dev.sh test   set up, then the fast tests, ruff, mypy, the other tests (arguments: pytest's)
#   ./dev.sh setup  only install what is needed (Debian packages, the virtualenv)
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_PACKAGES=(python3 python3-venv python3-dev gcc ipmitool postgresql iproute2
    qemu-utils qemu-block-extra qemu-system-x86 tgt parted e2fsprogs dosfstools mtools
    extlinux syslinux syslinux-common util-linux dnsmasq-base ipxe busybox-static tftp-hpa
    mmdebstrap zstd cpio slapd ldap-utils chromium chromium-driver nftables udpcast
    ceph-mon ceph-osd ceph-common python3-rbd tgt-rbd ovmf shim-signed grub-efi-amd64-signed
    nginx)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

setup() {
    local missing=()
    for package in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    # The front's nginx workers run as this system user when the service runs as root
    # (labmetal/front.py); deploy/install.sh makes it on a lab's server the same way.
    if ! getent passwd labmetal-front > /dev/null; then
        as_root useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin labmetal-front
    fi
    # PostgreSQL is needed as a package only: the tests start their own private clusters.
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
        .venv/bin/pip install -q --upgrade pip
        .venv/bin/pip install -q -e '.[test]'
        touch .venv/.installed
    fi
    # python3-rbd/rados are built for Debian's Python 3.11 only: the venv links them in.
    .venv/bin/python -m labmetal.images.overlays.ceph link-debian-modules
}

# The deploy ramdisk is built once from Debian packages and kept here between runs.
export LABMETAL_RAMDISK_CACHE=${LABMETAL_RAMDISK_CACHE:-/var/cache/labmetal/ramdisk}
export LABMETAL_OSIMAGE_CACHE=${LABMETAL_OSIMAGE_CACHE:-/var/cache/labmetal/osimage}

# The simulated lab makes network namespaces, bridges and taps: the demo and the tests run
# as root (through sudo when needed).
in_lab() {
    exec_as_root=(env "LABMETAL_RAMDISK_CACHE=$LABMETAL_RAMDISK_CACHE"
                  "LABMETAL_OSIMAGE_CACHE=$LABMETAL_OSIMAGE_CACHE" "$@")
    if [ "$(id -u)" -eq 0 ]; then exec "${exec_as_root[@]}"; else exec sudo "${exec_as_root[@]}"; fi
}

# `./dev.sh test`: the fast tier first (pure code, seconds, as the calling user; see
# tests/conftest.py), then ruff and mypy (configured in pyproject.toml), then every other test
# as root. Extra arguments go to both pytest runs; a run in which they select nothing (pytest's
# exit status 5: they named tests of the other tier only) is not a failure.
run_tests() {
    tier .venv/bin/pytest -m fast "$@"
    .venv/bin/ruff check .
    typecheck
    tier as_root env "LABMETAL_RAMDISK_CACHE=$LABMETAL_RAMDISK_CACHE" \
        "LABMETAL_OSIMAGE_CACHE=$LABMETAL_OSIMAGE_CACHE" .venv/bin/pytest -m "not fast" "$@"
}

# mypy follows imports by module name, and setuptools installs api/, conductor/, ... as
# labmetal.api, labmetal.conductor, ... (pyproject.toml): the check runs over a tree of links
# laid out as the installed package, so that every import between the parts is checked.
typecheck() {
    local tree=.typecheck/labmetal part
    rm -rf .typecheck
    mkdir -p "$tree"
    for part in labmetal/*; do ln -s "$PWD/$part" "$tree/"; done
    for part in api conductor images pxe agent lab; do ln -s "$PWD/$part" "$tree/$part"; done
    (cd .typecheck && ../.venv/bin/mypy --config-file ../pyproject.toml -p labmetal)
}

tier() { "$@" || { local status=$?; [ "$status" -eq 5 ] || exit "$status"; }; }

command=${1:-demo}
shift || true
case "$command" in
    setup) setup ;;
    demo) setup; in_lab .venv/bin/labmetal demo "$@" ;;
    test) setup; run_tests "$@" ;;
    *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac
