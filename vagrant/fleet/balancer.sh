#!/usr/bin/env bash
# Provisions the fleet demo's balancer VM: HAProxy from Debian with the demo's config (uploaded to /tmp/haproxy.cfg).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
command -v haproxy >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq haproxy >&2; }
haproxy -c -f /tmp/haproxy.cfg
install -m 0644 /tmp/haproxy.cfg /etc/haproxy/haproxy.cfg
systemctl enable haproxy >/dev/null 2>&1
systemctl restart haproxy
echo "balancer: HAProxy on :80 (the host's 8080) over app1 and app2; admin socket /run/haproxy/admin.sock" >&2
