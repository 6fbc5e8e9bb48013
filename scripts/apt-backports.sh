#!/usr/bin/env bash
# Adds Debian's bookworm-backports suite from the mirror this host already uses for bookworm,
# and pins runsc (only runsc) to it.
set -euo pipefail
src=/etc/apt/sources.list.d/vivarium-backports.sources
pin=/etc/apt/preferences.d/vivarium-runsc
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  uri=$(awk '/^URIs:/{u=$2} /^Suites:.*(^| )bookworm( |$)/{print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1=="deb" && $3=="bookworm"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || { echo "no apt source for Debian bookworm found: add bookworm-backports by hand" >&2; exit 1; }
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$src"
fi
printf 'Package: runsc\nPin: release n=bookworm-backports\nPin-Priority: 990\n' > "$pin"
