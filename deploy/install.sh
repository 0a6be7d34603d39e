#!/usr/bin/env bash
# Install labmetal on a lab's server (Debian 12), from this checkout:
#   - the Debian packages the service runs (nginx for its front, dnsmasq, iPXE, shim and
#     GRUB, tgt, QEMU's tools) and those `labmetal images build-ramdisk` needs;
#   - labmetal itself in a virtualenv, /opt/labmetal (the command: /usr/local/bin/labmetal);
#   - its systemd units (deploy/systemd/) in /etc/systemd/system;
#   - its settings, /etc/labmetal/labmetal.env (mode 0600, in a 0700 directory), written
#     once from the options below: a settings file that exists is never changed.
# Nothing is enabled or started: read the settings, then `systemctl enable --now labmetal`.
# Run it again after `git pull` to upgrade labmetal and the units.
#
#   sudo deploy/install.sh [--listen HOST:PORT] [--tls-listen HOST:PORT]
#        [--dhcp-interface IF --dhcp-network NET/LEN [--dhcp-pool FIRST,LAST]
#         [--dhcp-mode server|proxy]] [--tftp-listen HOST:69] [--prefix DIR]
#   deploy/install.sh --root DIR [...]   the units and the settings only, under DIR
#                                        (packaging, tests): no packages, no virtualenv,
#                                        no systemctl
set -euo pipefail
source_dir=$(cd "$(dirname "$0")/.." && pwd)

RUNTIME_PACKAGES=(python3 python3-venv nginx dnsmasq-base ipxe shim-signed
    grub-efi-amd64-signed tgt qemu-utils qemu-system-common fuse3 iproute2 ipmitool
    mmdebstrap zstd cpio busybox-static)

root=/
prefix=/opt/labmetal
declare -A settings=([LISTEN]="" [TLS_LISTEN]="" [DHCP_INTERFACE]="" [DHCP_NETWORK]=""
                     [DHCP_POOL]="" [DHCP_MODE]="" [TFTP_LISTEN]="")
while [ $# -gt 0 ]; do
    option=$1
    case "$option" in
        --root|--prefix|--listen|--tls-listen|--dhcp-interface|--dhcp-network|--dhcp-pool|\
        --dhcp-mode|--tftp-listen) ;;
        *) echo "install.sh: unknown option $option (see the top of $0)" >&2; exit 2 ;;
    esac
    [ $# -ge 2 ] || { echo "install.sh: $option needs a value" >&2; exit 2; }
    case "$option" in
        --root) root=$2 ;;
        --prefix) prefix=$2 ;;
        *) name=${option#--}; name=${name//-/_}; settings[${name^^}]=$2 ;;
    esac
    shift 2
done

on_this_system() { [ "$root" = / ]; }

if on_this_system; then
    [ "$(id -u)" -eq 0 ] || { echo "install.sh: run it as root (sudo)" >&2; exit 1; }
    echo "installing Debian packages: ${RUNTIME_PACKAGES[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${RUNTIME_PACKAGES[@]}"
    # Debian's nginx package starts its own server on port 80 with a welcome page. labmetal
    # runs its own nginx (its front); that one is not needed, and on the seat network
    # nothing is exposed that is not needed.
    if systemctl is-enabled --quiet nginx.service 2>/dev/null \
            && [ "$(ls /etc/nginx/sites-enabled 2>/dev/null)" = default ]; then
        echo "disabling Debian's own nginx.service (port 80, welcome page): labmetal runs its own"
        systemctl disable --now nginx.service
    fi
    # nginx's workers (the front) parse what every client sends: not as root.
    if ! getent passwd labmetal-front > /dev/null; then
        echo "making the system user labmetal-front (the front's nginx workers)"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin labmetal-front
    fi
    echo "installing labmetal into $prefix"
    [ -x "$prefix/bin/python" ] || python3 -m venv "$prefix"
    "$prefix/bin/pip" install -q --upgrade pip
    "$prefix/bin/pip" install -q --upgrade "$source_dir"
    ln -sf "$prefix/bin/labmetal" /usr/local/bin/labmetal
fi

units="$root/etc/systemd/system"
install -d -m 0755 "$units"
for unit in "$source_dir"/deploy/systemd/*.service; do
    target="$units/$(basename "$unit")"
    sed "s#/opt/labmetal/bin/labmetal#$prefix/bin/labmetal#" "$unit" > "$target.new"
    chmod 0644 "$target.new"
    mv "$target.new" "$target"
done
echo "units: $(cd "$source_dir/deploy/systemd" && echo *.service) in $units"

config="$root/etc/labmetal"
install -d -m 0700 "$config"
env_file="$config/labmetal.env"
if [ -e "$env_file" ]; then
    echo "settings: $env_file exists, left as it is"
else
    (
        umask 077
        {
            cat <<'HEAD'
# labmetal's settings: each option of `labmetal serve --help` as LABMETAL_<NAME>.
# Read by the labmetal units. Mode 0600: it may hold the database's password.
# After a change: systemctl restart labmetal
# LISTEN: the server's address on the room's network (seats boot from it; plain HTTP).
HEAD
            echo "LABMETAL_LISTEN=${settings[LISTEN]:-127.0.0.1:6385}"
            echo "LABMETAL_STATE_DIR=/var/lib/labmetal"
            for name in TLS_LISTEN TFTP_LISTEN DHCP_INTERFACE DHCP_NETWORK DHCP_POOL DHCP_MODE; do
                if [ -n "${settings[$name]}" ]; then
                    echo "LABMETAL_$name=${settings[$name]}"
                fi
            done
            cat <<'TAIL'
# The HTTPS listener (default: the listen host, port 6443), or your own certificate:
# LABMETAL_TLS_LISTEN=6443
# LABMETAL_TLS_CERT=/etc/labmetal/server.crt
# LABMETAL_TLS_KEY=/etc/labmetal/server.key
# Where seats reach labmetal, if not at the listen address:
# LABMETAL_SEAT_URL=http://10.10.0.2:6385
# labmetal-api + labmetal-conductor instead of labmetal (several conductors):
# LABMETAL_DATABASE=postgresql+psycopg://labmetal:PASSWORD@127.0.0.1/labmetal
TAIL
        } > "$env_file.new"
    )
    mv "$env_file.new" "$env_file"
    echo "settings: $env_file written (mode 0600)"
fi

if on_this_system; then
    systemctl daemon-reload
    echo "done. Check $env_file, then: systemctl enable --now labmetal"
fi
