#!/usr/bin/env bash
# Installs portflip on a Debian or Ubuntu server (the Vagrant VM or a plain one) and runs a sample app on port 80 under it.
#
# Usage: sudo vagrant/provision.sh [--source DIR] [--executable FILE | --build] [--prefix DIR] [--no-systemd] [--no-apt] [--no-sample]
#   --source DIR   the portflip repo to install from (default: the repo this script is in)
#   --executable FILE  install this single executable (npm run package) as portflip: no Node.js or npm for
#                  portflip itself. Default: DIR/dist/package/portflip-VERSION-linux-ARCH when it was built
#   --build        build from source instead, in /opt/portflip (needs Node.js >= 20 and npm from the distro)
#   --prefix DIR   install under DIR instead of / (also PORTFLIP_PROVISION_ROOT): DIR/opt/portflip,
#                  DIR/usr/local/bin/portflip, DIR/srv/portflip-sample, DIR/etc/systemd/system;
#                  no user is created, and nothing outside DIR is written (apt aside)
#   --no-systemd   write the unit file but do not enable or start it; print the deploy command instead
#   --no-apt       never run apt-get: fail if something is missing
#   --no-sample    install portflip only: no sample app, no unit (what the Ansible role uses)
# Safe to run again: it reinstalls portflip and redeploys the sample app with zero downtime.
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${PORTFLIP_PROVISION_ROOT:-}"
systemd=1
apt=1
sample=1
exe=""
build=0
while (($#)); do
  case "$1" in
    --source) src="$(cd "$2" && pwd)"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --no-systemd) systemd=0; shift ;;
    --no-apt) apt=0; shift ;;
    --no-sample) sample=0; shift ;;
    --executable) exe="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --build) build=1; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "provision: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$prefix" ]; then
  mkdir -p "$prefix"
  prefix="$(cd "$prefix" && pwd)"
fi

APP=sample
APP_USER=portflip-sample
OPT="$prefix/opt/portflip"
BIN="$prefix/usr/local/bin/portflip"
APP_DIR="$prefix/srv/portflip-sample"
UNIT_DIR="$prefix/etc/systemd/system"
UNIT=portflip-sample.service

say() { echo "provision: $*" >&2; }
die() { say "$*"; exit 1; }

[ -f "$src/package.json" ] && [ -f "$src/vagrant/sample-app/server.js" ] || die "$src is not a portflip checkout (use --source DIR)"
if [ -z "$prefix" ] && [ "$(id -u)" -ne 0 ]; then die "run it as root (sudo), or with --prefix DIR to install somewhere else"; fi

# 0. The executable built for this machine's arch, unless --build (read without node: there may be none)
if ((!build)) && [ -z "$exe" ]; then
  version=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' "$src/package.json")
  case "$(uname -m)" in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) arch=none ;; esac
  candidate="$src/dist/package/portflip-$version-linux-$arch"
  if [ -x "$candidate" ]; then exe="$candidate"; else build=1; say "no $candidate (npm run package): building from source"; fi
fi
[ -z "$exe" ] || [ -x "$exe" ] || die "--executable $exe: no such executable file"

# 1. System packages: iptables, iproute2, conntrack; Node.js >= 20 and npm from the distro to build from source,
# and Node.js for the sample app (a Node app).
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
declare -A need=([iptables]=iptables [iptables-restore]=iptables [ip]=iproute2 [conntrack]=conntrack)
if ((build)); then need[npm]=npm; fi
if ((sample)); then need[node]=nodejs; fi
missing=()
for cmd in "${!need[@]}"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}"); done
if ((build)) && [ "$(node_major)" -lt 20 ]; then missing+=(nodejs); fi
if ((${#missing[@]})); then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  ((apt)) || die "missing: $pkgs(and --no-apt was given)"
  command -v apt-get >/dev/null 2>&1 || die "missing: $pkgs; this script installs them with apt-get only (Debian, Ubuntu)"
  [ "$(id -u)" -eq 0 ] || die "missing: $pkgs; installing them needs root"
  say "installing with apt-get: $pkgs"
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >&2
fi
if ((build)) && [ "$(node_major)" -lt 20 ]; then
  die "Node.js >= 20 is needed, and this distro's nodejs is $(node --version 2>/dev/null || echo missing) (Debian 13 and Ubuntu 25.04 ship 20). Install Node.js 20 or later another way, then run this again."
fi
say "$(iptables --version)$( ((build)) && echo ", node $(node --version)")"

# 2. portflip itself: the executable copied in place (a running portflip keeps the file it started from), or a
# clean copy of the source in OPT, built there, dev dependencies pruned, linked on PATH.
if [ -n "$exe" ]; then
  mkdir -p "$(dirname "$BIN")"
  install -m 0755 "$exe" "$BIN.new"
  mv -f "$BIN.new" "$BIN"
  "$BIN" --version >/dev/null || die "$BIN does not run"
  say "installed $BIN from $exe ($("$BIN" --version))"
else
say "installing portflip from $src into $OPT"
stage="$OPT.new"
rm -rf "$stage"
mkdir -p "$stage"
tar -C "$src" --exclude=./.git --exclude=./node_modules --exclude=./dist --exclude=./bench/results \
  --exclude=./vagrant/.vagrant -cf - . | tar -C "$stage" -xf -
(
  cd "$stage"
  npm ci --no-audit --no-fund --loglevel=error >&2
  npm run build --silent >&2
  npm prune --omit=dev --no-audit --no-fund --loglevel=error >&2
)
rm -rf "$OPT.old"
if [ -e "$OPT" ]; then mv "$OPT" "$OPT.old"; fi
mv "$stage" "$OPT"
rm -rf "$OPT.old"
mkdir -p "$(dirname "$BIN")"
ln -sfn "$OPT/dist/src/main.cjs" "$BIN"
"$BIN" --version >/dev/null || die "$BIN does not run"
say "installed $BIN -> $OPT/dist/src/main.cjs ($("$BIN" --version))"
fi

if ((!sample)); then
  say "--no-sample: portflip is installed; no sample app"
  exit 0
fi

# 3. The sample app, run as its own unprivileged user.
mkdir -p "$APP_DIR"
install -m 0644 "$src/vagrant/sample-app/server.js" "$src/vagrant/sample-app/package.json" "$APP_DIR/"
chmod 0755 "$APP_DIR"
user_flag=(--user "$APP_USER")
if [ -n "$prefix" ]; then
  say "--prefix: not creating user $APP_USER; the app runs as the deploying user"
  user_flag=()
elif ! id "$APP_USER" >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$APP_USER"
  say "created system user $APP_USER"
fi

# 4. A oneshot unit: start deploys the app behind port 80, reload redeploys it with zero downtime, stop stops it.
node_bin="$(command -v node)"
deploy=("$BIN" deploy "$APP" --listen 80 --ports 8001,8002 --cwd "$APP_DIR" "${user_flag[@]}"
  --ready 'http://127.0.0.1:{port}/health' -- "$node_bin" server.js)
mkdir -p "$UNIT_DIR"
cat >"$UNIT_DIR/$UNIT.tmp" <<UNIT
# Written by portflip's vagrant/provision.sh. The app runs detached under portflip; this unit deploys it at boot.
[Unit]
Description=portflip sample app on port 80
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
TimeoutStartSec=120
ExecStart=${deploy[*]}
ExecReload=${deploy[*]}
ExecStop=$BIN stop $APP

[Install]
WantedBy=multi-user.target
UNIT
mv "$UNIT_DIR/$UNIT.tmp" "$UNIT_DIR/$UNIT"
say "wrote $UNIT_DIR/$UNIT"

if ((systemd)) && [ -z "$prefix" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable "$UNIT" >/dev/null 2>&1
  # Active already (a second run): reload is a zero-downtime redeploy with the new build.
  systemctl reload-or-restart "$UNIT"
  systemctl is-active --quiet "$UNIT" || die "$UNIT did not start: journalctl -u $UNIT"
  say "$UNIT is active: port 80 -> $("$BIN" status "$APP" --json | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const a=JSON.parse(s).apps[0];console.log(a.active?a.active.port:"none")})')"
  say "redeploy with: sudo systemctl reload $UNIT    (or run the deploy command by hand)"
else
  say "systemd not used; deploy the sample app by hand with:"
  printf '  sudo %s\n' "${deploy[*]}" >&2
fi
