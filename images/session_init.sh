#!/bin/sh
# labmetal session initramfs /init (busybox sh): assemble a local session's root from the
# seat's labmetal cache region with device-mapper, then switch_root into the template.
#
# Kernel command line (numbers in 512-byte sectors):
#   labmetal.cache=<32 hex id>@<start>   the cache region: absolute sector <start> of one of
#                                        the seat's disks, which begins with
#                                        "LABMETAL-CACHE01" and the id
#   labmetal.origin=<off>+<len>          the template copy, relative to the cache start
#   labmetal.cow=<off>+<len>             the COW store (persistent snapshot), same
#   labmetal.chunk=<sectors>             the snapshot's chunk size
#   labmetal.root=<off>+<len>            the root filesystem's range inside the template
#   labmetal.fstype=<type>               its filesystem (ext4)
#   init=<path>                          optional, default /sbin/init; ro/rw are ignored
#   labmetal.wait=<seconds>              optional: how long to look for the disk (30)
# Nothing here touches the network. Any failure prints "labmetal-session: <why>" and
# leaves a shell on the console for the person at the seat.
export PATH=/bin DM_DISABLE_UDEV=1
REQUESTS_SECTOR=1024  # the cache's save requests: 512 KiB from its start (agent/seat_cache.py)
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys

say() {  # on the console, and on ttyS0 too if the console is elsewhere
    echo "labmetal-session: $1"
    grep -q '^ttyS0 .*(.*C.*)' /proc/consoles 2>/dev/null ||
        { [ -c /dev/ttyS0 ] && echo "labmetal-session: $1" > /dev/ttyS0 2>/dev/null; }
}
fail() {
    say "$1"
    while :; do setsid -c sh -i 2>/dev/null || sh -i; sleep 1; done
}
arg() {  # the value of NAME= on the kernel command line
    for word in $(cat /proc/cmdline); do
        case $word in "$1"=*) echo "${word#*=}"; return ;; esac
    done
}
number() { case $1 in ''|*[!0-9]*) return 1 ;; esac; }
range() {  # "<off>+<len>" of parameter $1: sets off and len
    local value
    value=$(arg "$1")
    off=${value%%+*} len=${value#*+}
    number "$off" && number "$len" && [ "$len" -gt 0 ] ||
        fail "$1=$value: expected <offset>+<length> in sectors"
}

cache=$(arg labmetal.cache)
id=${cache%%@*} start=${cache#*@}
case $id in
    *[!0-9a-fA-F]*|'') fail "labmetal.cache=$cache: expected <32 hex id>@<sector>" ;;
esac
[ ${#id} -eq 32 ] && number "$start" || fail "labmetal.cache=$cache: expected <32 hex id>@<sector>"
id=$(echo "$id" | tr A-F a-f)
range labmetal.origin; origin_off=$off origin_len=$len
range labmetal.cow; cow_off=$off cow_len=$len
range labmetal.root; root_off=$off root_len=$len
chunk=$(arg labmetal.chunk)
number "$chunk" && [ "$chunk" -gt 0 ] || fail "labmetal.chunk=$chunk: expected sectors"
fstype=$(arg labmetal.fstype)
case $fstype in ''|*[!a-z0-9]*) fail "labmetal.fstype=$fstype: expected a filesystem type" ;; esac
init=$(arg init)
init=${init:-/sbin/init}
case $init in /*) ;; *) fail "init=$init: expected an absolute path" ;; esac
[ $((root_off + root_len)) -le "$origin_len" ] ||
    fail "labmetal.root=$root_off+$root_len lies outside the template ($origin_len sectors)"

while read -r module; do
    insmod "/lib/modules/$module" 2>/tmp/insmod.log ||
        grep -q 'File exists' /tmp/insmod.log ||
        say "insmod $module: $(tail -n 1 /tmp/insmod.log) (going on)"
done < /lib/modules/load-order

# The disk whose sector $start begins with the cache header; disks appear a moment after
# their driver loads.
want="LABMETAL-CACHE01$id"
uptime() { read -r up rest < /proc/uptime; echo "${up%%.*}"; }
disk= seen=
wait=$(arg labmetal.wait)  # seconds to wait for the disk (default 30)
number "$wait" || wait=30
deadline=$(($(uptime) + wait))
while [ "$(uptime)" -le "$deadline" ]; do
    for block in /sys/block/*; do
        name=${block##*/}
        case $name in loop*|ram*|dm-*|sr*|zram*) continue ;; esac
        seen="$seen $name"
        [ -b "/dev/$name" ] && [ "$(cat "$block/size" 2>/dev/null || echo 0)" -gt "$start" ] || continue
        header=$(dd if="/dev/$name" bs=512 skip="$start" count=1 2>/dev/null | head -c 48 |
                 tr -c 'A-Za-z0-9-' '?')
        if [ "$header" = "$want" ]; then disk=$name; break 2; fi
    done
    sleep 0.2
done
[ -n "$disk" ] || fail "no disk has the labmetal cache $id at sector $start (disks:$(echo "$seen" | tr ' ' '\n' | sort -u | tr '\n' ' '))"

dev=/dev/$disk
dm() { dmsetup --noudevsync "$@" 2>/tmp/dm.log || fail "dmsetup $*: $(tail -n 1 /tmp/dm.log)"; }
dm create lm-origin --readonly --table "0 $origin_len linear $dev $((start + origin_off))"
dm create lm-cow --table "0 $cow_len linear $dev $((start + cow_off))"
dm create lm-disk --table "0 $origin_len snapshot /dev/mapper/lm-origin /dev/mapper/lm-cow P $chunk"
dm create lm-root --table "0 $root_len linear /dev/mapper/lm-disk $root_off"
dmsetup --noudevsync mknodes 2>/dev/null
mount -t "$fstype" -o rw /dev/mapper/lm-root /root 2>/tmp/mount.log ||
    fail "mount of the root ($fstype) failed: $(tail -n 1 /tmp/mount.log)"
[ -x "/root$init" ] || [ -L "/root$init" ] || fail "the template has no $init"
say "root assembled on $dev"
# A save asked from inside the OS (sh /run/labmetal/save LABEL, session_save.sh) is kept on
# this disk, in the cache's save requests, until the seat's upload carries it: it needs no
# network. It lives in the OS's /run, a tmpfs mounted here as Debian's initramfs does
# (the OS's init keeps a /run it finds mounted).
if [ -d /root/run ] && mount -t tmpfs -o nodev,noexec,nosuid,size=10%,mode=0755 \
        tmpfs /root/run 2>/dev/null; then
    mkdir -p /root/run/labmetal
    cp /lib/labmetal/save /root/run/labmetal/save
    echo "$dev $((start + REQUESTS_SECTOR))" > /root/run/labmetal/cache
fi
for fs in dev proc sys; do
    if [ -d "/root/$fs" ]; then
        mount --move "/$fs" "/root/$fs"
    else
        umount "/$fs"
    fi
done
exec switch_root /root "$init"
