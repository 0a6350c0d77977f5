#!/usr/bin/env bash
# System packages the full test suite needs on Debian 12 (bookworm); a no-op for what is present.
#  - Mesa's lavapipe (software Vulkan) from bookworm-backports: stock Mesa 22.3 offers no adapter that
#    WebGPU accepts, 25.x does. Used by the WebGPU execution-provider test (issue 7).
#  - Debian's Chromium, driven by playwright-core in the in-browser demo test.
# The bookworm-backports source is derived from the machine's own apt sources: the URI that serves
# "bookworm main" (one-line sources.list / *.list, or deb822 *.sources), added with suite bookworm-backports
# in the same format, unless a backports source exists already.
# Test hooks: APT_ROOT (default /) prefixes every apt path read or written; DRY_RUN=1 prints the source it
# would write (or that one exists) and exits before apt-get, writing nothing.
set -euo pipefail
APT="${APT_ROOT:-/}"; APT="${APT%/}/etc/apt"
DRY_RUN="${DRY_RUN:-0}"

# Prints "exists FILE", or the format (list|sources) then the new source's text; exit 1 when no bookworm
# main source is found. Arguments: the apt source files, in apt's reading order.
derive_backports() {
  awk '
    function has(list, word,   n, a, i) {
      n = split(list, a, /[ \t]+/); for (i = 1; i <= n; i++) if (a[i] == word) return 1; return 0
    }
    function consider(fmt, uri, extra,   score) {  # prefer a URI whose path is .../debian: the archive
      score = (uri ~ /\/debian\/?$/) ? 2 : 1
      if (score > best) { best = score; bfmt = fmt; buri = uri; bextra = extra }
    }
    function flush(   u) {  # the end of a deb822 stanza
      if (nf && enabled != "no" && has(types, "deb")) {
        if (has(suites, "bookworm-backports")) backports = sfile
        split(uris, u, /[ \t]+/)
        if (has(suites, "bookworm") && has(comps, "main") && u[1] != "") consider("sources", u[1], extra)
      }
      nf = 0; types = uris = suites = comps = enabled = extra = ""; keep = 0
    }
    FNR == 1 { flush(); deb822 = (FILENAME ~ /\.sources$/) }
    deb822 {
      if ($0 ~ /^#/) next
      if ($0 ~ /^[ \t]*$/) { flush(); next }
      if ($0 ~ /^[ \t]/) { if (keep) extra = extra "\n" $0; next }  # a continuation line
      key = tolower($0); sub(/:.*/, "", key)
      val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
      nf++; sfile = FILENAME; keep = 0
      if (key == "types") types = val
      else if (key == "uris") uris = val
      else if (key == "suites") suites = val
      else if (key == "components") comps = val
      else if (key == "enabled") enabled = tolower(val)
      else { keep = 1; extra = extra "\n" $0 }  # Signed-By, Architectures, ...: carried over as they are
      next
    }
    {
      line = $0; sub(/#.*/, "", line); sub(/^[ \t]+/, "", line); sub(/[ \t]+$/, "", line)
      n = split(line, f, /[ \t]+/)
      if (n < 4 || f[1] != "deb") next
      i = 2; opts = ""
      if (f[2] ~ /^\[/) {  # [option=value ...], possibly over several words
        while (i <= n) { opts = opts (opts == "" ? "" : " ") f[i]; i++; if (f[i - 1] ~ /\]$/) break }
      }
      if (i + 2 > n) next
      if (f[i + 1] == "bookworm-backports") backports = FILENAME
      main = 0; for (j = i + 2; j <= n; j++) if (f[j] == "main") main = 1
      if (f[i + 1] == "bookworm" && main) consider("list", f[i], opts)
    }
    END {
      flush()
      if (backports != "") { print "exists " backports; exit 0 }
      if (!best) exit 1
      print bfmt
      if (bfmt == "list") print "deb " (bextra == "" ? "" : bextra " ") buri " bookworm-backports main"
      else {
        print "Types: deb"; print "URIs: " buri; print "Suites: bookworm-backports"; print "Components: main"
        if (bextra != "") print substr(bextra, 2)
      }
    }' "$@" </dev/null
}

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ "$DRY_RUN" != 1 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "system-deps: not a Debian system; install Mesa >= 25 (lavapipe), libvulkan1 and chromium by hand" >&2
    exit 1
  fi
  need=()
  dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^25\.' || need+=(mesa)
  dpkg -s libvulkan1 >/dev/null 2>&1 || need+=(vulkan)
  command -v chromium >/dev/null || need+=(chromium)
  [ ${#need[@]} -eq 0 ] && exit 0
fi

files=()
[ -f "$APT/sources.list" ] && files+=("$APT/sources.list")
for f in "$APT"/sources.list.d/*.list "$APT"/sources.list.d/*.sources; do [ -f "$f" ] && files+=("$f"); done
derived=""
[ ${#files[@]} -gt 0 ] && derived="$(derive_backports "${files[@]}")" || true
if [ -z "$derived" ]; then
  echo "system-deps: no 'bookworm main' apt source in $APT/sources.list or $APT/sources.list.d/ to derive bookworm-backports from; add one by hand" >&2
  exit 1
fi
fmt="${derived%%$'\n'*}"
if [ "${fmt%% *}" = exists ]; then
  [ "$DRY_RUN" = 1 ] && echo "system-deps: a bookworm-backports source exists: ${fmt#exists }"
else
  dest="$APT/sources.list.d/backports.$fmt"
  text="${derived#*$'\n'}"
  if [ "$DRY_RUN" = 1 ]; then
    printf 'system-deps: would write %s:\n%s\n' "$dest" "$text"
  else  # atomically: a temporary file in the same folder, then renamed
    printf '%s\n' "$text" | $SUDO tee "$dest.tmp.$$" >/dev/null
    $SUDO chmod 644 "$dest.tmp.$$"
    $SUDO mv -f "$dest.tmp.$$" "$dest"
  fi
fi
[ "$DRY_RUN" = 1 ] && exit 0
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
$SUDO apt-get install -y -qq libvulkan1 chromium >/dev/null
