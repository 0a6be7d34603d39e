#!/bin/sh
# labmetal: ask, from inside a local session's OS, for a save point of the session.
#   sh /run/labmetal/save LABEL
# The request is written to this seat's disk (the save requests of labmetal's cache,
# agent/seat_cache.py), so it needs no network: a network TP may have taken it down. The
# seat's upload when the session ends carries it, and labmetal makes the save point from
# that upload once it has verified it. labmetal's session initramfs (session_init.sh) puts
# this script in /run/labmetal with a file "cache": the disk and the sector of the requests.
here=$(dirname "$0")
label="$*"
case $label in
    '' | *'
'*) echo "usage: sh $0 LABEL (1 to 64 characters, one line)" >&2; exit 2 ;;
esac
if [ "${#label}" -gt 64 ]; then
    echo "a save label has at most 64 characters" >&2; exit 2
fi
read -r disk sector < "$here/cache" || { echo "no labmetal cache on this seat" >&2; exit 1; }
old=$(dd if="$disk" bs=512 skip="$sector" count=8 2>/dev/null | tr -d '\000')
case $old in
    LABMETAL-SAVE01*) ;;
    *) old=LABMETAL-SAVE01 ;;
esac
if [ "$(printf '%s\n' "$old" | wc -l)" -gt 16 ]; then
    echo "16 saves are queued already; they are made when the session ends" >&2; exit 1
fi
# the requests, then zeros, 4096 bytes in all, synced to the disk
{ printf '%s\n%s\n' "$old" "$label"; dd if=/dev/zero bs=4096 count=1 2>/dev/null; } |
    head -c 4096 | dd of="$disk" bs=512 seek="$sector" count=8 conv=notrunc,fsync 2>/dev/null ||
    { echo "the request could not be written to $disk" >&2; exit 1; }
echo "labmetal: save \"$label\" queued on this seat's disk: it is made from what this seat uploads when the session ends"
