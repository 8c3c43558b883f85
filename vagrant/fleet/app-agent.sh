#!/usr/bin/env bash
# Provisions `portflip agent sample` as a systemd service on a fleet demo app VM (after provision.sh installed portflip).
set -euo pipefail
cat >/etc/systemd/system/portflip-agent-sample.service <<'UNIT'
# Answers HAProxy's agent-check for the sample app from portflip's state (read-only).
[Unit]
Description=portflip agent for the sample app (HAProxy agent-check on port 9777)
After=network-online.target portflip-sample.service

[Service]
ExecStart=/usr/local/bin/portflip agent sample --port 9777
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now portflip-agent-sample.service
echo "app: portflip agent sample answering on :9777" >&2
