#!/usr/bin/env bash
# Provisions the fleet demo's balancer VM: HAProxy from Debian with the demo's config (uploaded to /tmp/haproxy.cfg).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
command -v haproxy >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq haproxy >&2; }
command -v socat >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq socat >&2; }
# systemctl reload haproxy saves the servers' runtime state first, so a drained host is not put back by a reload
mkdir -p /etc/systemd/system/haproxy.service.d
cat >/etc/systemd/system/haproxy.service.d/server-state.conf <<'UNIT'
[Service]
ExecReload=
ExecReload=/usr/sbin/haproxy -Ws -f $CONFIG -c -q $EXTRAOPTS
ExecReload=/bin/sh -c 'echo "show servers state" | socat stdio unix-connect:/run/haproxy/admin.sock > /var/lib/haproxy/server-state'
ExecReload=/bin/kill -USR2 $MAINPID
UNIT
systemctl daemon-reload
haproxy -c -f /tmp/haproxy.cfg
install -m 0644 /tmp/haproxy.cfg /etc/haproxy/haproxy.cfg
systemctl enable haproxy >/dev/null 2>&1
systemctl restart haproxy
echo "balancer: HAProxy on :80 (the host's 8080) over app1 and app2; admin socket /run/haproxy/admin.sock" >&2
