#!/usr/bin/env bash
# `npm run demo`: installs what is missing (npm packages, the build, iptables/iproute2), then runs scripts/demo.mjs as root.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "demo: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "needs root: it makes throwaway network namespaces and nat rules inside them (never in this host's own rules)."
  say "run it again with: sudo npm run demo"
  exit 1
fi

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  say "Node.js >= 20 is needed, found $(node --version 2>/dev/null || echo none)"
  exit 1
fi

# command -> Debian package that provides it (unshare and nsenter come with util-linux, which Debian always has)
declare -A need=(
  [iptables]=iptables [iptables-save]=iptables [iptables-restore]=iptables
  [ip]=iproute2 [unshare]=util-linux [nsenter]=util-linux
)
missing=()
for cmd in "${!need[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1; then missing+=("${need[$cmd]}"); fi
done
if ((${#missing[@]})); then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if ! command -v apt-get >/dev/null 2>&1; then
    say "missing packages: $pkgs; install them with your package manager and run again"
    exit 1
  fi
  say "installing with apt-get: $pkgs"
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >&2
fi

# Under sudo, install and build as the user who owns the clone, so that a later `npm test` can rebuild dist/.
as_owner=()
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && [ "$(stat -c %U .)" = "$SUDO_USER" ]; then
  as_owner=(sudo -u "$SUDO_USER" -H env "PATH=$PATH")
fi

if [ ! -d node_modules ]; then
  say "installing npm dependencies (npm ci)"
  "${as_owner[@]}" npm ci --no-audit --no-fund >&2
fi
if [ ! -f dist/src/main.cjs ] || [ ! -f dist/test/helpers/netns.js ] ||
  [ -n "$(find src test package.json tsconfig.json -newer dist/src/main.cjs -type f -print -quit)" ]; then
  say "building (npm run build)"
  "${as_owner[@]}" npm run build --silent >&2
fi

exec node scripts/demo.mjs "$@"
