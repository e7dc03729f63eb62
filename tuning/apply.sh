#!/usr/bin/env bash
# Applies the shardcast kernel profile and limits on this box (run as root), then runs
# `shardcast doctor` if the binary is on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
install -m 644 "$here/60-shardcast.conf" /etc/sysctl.d/60-shardcast.conf
# The conntrack keys exist only with the nf_conntrack module loaded.
modprobe nf_conntrack 2>/dev/null || true
sysctl --load=/etc/sysctl.d/60-shardcast.conf || echo "some keys were not applied (see above)"
install -m 644 "$here/limits.conf" /etc/security/limits.d/shardcast.conf
echo "profile applied: /etc/sysctl.d/60-shardcast.conf, /etc/security/limits.d/shardcast.conf"
if command -v shardcast >/dev/null 2>&1; then
  shardcast doctor ${SHARDCAST_CONFIG:+--config "$SHARDCAST_CONFIG"} || true
fi
