#!/bin/sh
# udhcpc's event script in the deploy ramdisk: applies a lease with iproute2. `replace`
# keeps the address in place on renewals, so the agent's connections survive them.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ;;
    bound | renew)
        ip -4 addr replace "$ip/$mask" dev "$interface" ${broadcast:+broadcast "$broadcast"}
        for gateway in $router; do
            ip -4 route replace default via "$gateway" dev "$interface"
            break
        done
        if [ -n "$dns" ]; then
            {
                [ -n "$domain" ] && echo "search $domain"
                for server in $dns; do echo "nameserver $server"; done
            } > /etc/resolv.conf
        fi
        ;;
esac
exit 0
