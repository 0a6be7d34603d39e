#!/bin/sh
# /init of labmetal's deploy ramdisk (PID 1; the initramfs stays the root filesystem).
# It only prepares what the agent cannot do for itself: kernel filesystems, drivers, an
# address on every ethernet interface. Then it runs the agent, which reads labmetal.api=
# and labmetal.mode= from /proc/cmdline. If the agent exits, the seat powers off, so a
# student at the console never gets a root shell with the deploy token; with
# labmetal.debug on the kernel command line it opens a shell on the console instead.
export PATH=/usr/sbin:/usr/bin HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { echo "labmetal-ramdisk: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
ip link set lo up

# Drivers as the hardware asks for them: every device's modalias, resolved by modprobe
# against the aliases of the modules the build shipped (PCs' and VMs' disks and NICs).
# A driver can bring new devices (a USB controller its disks and keyboards), so again
# until a round loads nothing new. Then the ones the agent needs whatever the hardware.
loaded=
for round in 1 2 3 4; do
    find /sys/devices -name modalias -exec cat {} + 2>/dev/null | sort -u \
        | xargs -r modprobe -a -q -b 2>/dev/null
    now=$(cut -d' ' -f1 /proc/modules | sort | paste -sd' ' -)
    [ "$now" = "$loaded" ] && break
    loaded=$now
done
modprobe -a $(cat /etc/labmetal/modules) || say "some drivers failed to load"
say "drivers: ${loaded:-none}"

# Every ethernet interface with a device behind it gets a DHCP client that keeps
# renewing its lease for as long as the deploy lasts.
interfaces=
for dev in /sys/class/net/*; do
    [ "$(cat "$dev/type")" = 1 ] && [ -e "$dev/device" ] || continue
    name=${dev##*/}
    interfaces="$interfaces $name"
    ip link set "$name" up
    busybox udhcpc -f -i "$name" -s /usr/lib/labmetal/udhcpc.sh &
done
[ -n "$interfaces" ] || say "no ethernet interface found"

address() { ip -4 -o addr show dev "$1" | while read -r _ _ _ cidr _; do echo "$cidr"; done; }

# Wait (up to 30 s) until every interface with a link has an address; an unplugged
# NIC does not hold the deploy up.
waited=0
while [ "$waited" -lt 150 ]; do
    configured=0 pending=0
    for name in $interfaces; do
        if [ -n "$(address "$name")" ]; then configured=1
        elif [ "$(cat "/sys/class/net/$name/carrier" 2>/dev/null)" = 1 ]; then pending=1
        fi
    done
    [ "$configured" = 1 ] && [ "$pending" = 0 ] && break
    sleep 0.2
    waited=$((waited + 1))
done

summary=
for name in $interfaces; do
    addresses=$(address "$name" | paste -sd, -)
    summary="$summary $name $(cat "/sys/class/net/$name/address") ${addresses:-no-address};"
done
[ -n "$summary" ] || summary=" no network"
say "starting agent on${summary%;}"

python3 -m labmetal.agent
status=$?
if [ "$status" -gt 128 ]; then
    say "agent killed by signal $((status - 128))"
else
    say "agent exited with status $status"
fi

case " $(cat /proc/cmdline) " in
    *" labmetal.debug "* | *" labmetal.debug="*)
        say "labmetal.debug is set: shell on the console (exit to get another one)"
        while :; do busybox setsid busybox cttyhack /bin/sh; done
        ;;
esac
say "powering off in 10 s (add labmetal.debug to the kernel command line for a shell)"
sleep 10
sync
busybox poweroff -f
