#!/usr/bin/env bash
# Runs on the CPU machine, before a device check: downloads the Debian packages the build needs
# into the ignored folder .gpu/, because the GPU machine has no package registry.
#
#   tools/gpu_prepare.sh        # then: run tools/gpu_check.sh on the device with carry [".gpu"]
#
# .gpu/ gets one .deb per package (the -dev packages of tools/setup.sh and the runtime libraries
# they need that a stock CUDA image lacks, plus pkgconf for pkg_check_modules),
# .gpu/packages.txt listing "name version file", and .gpu/tree.txt (HEAD and `git status`).
# Run it last, after committing: the device check is of the tree as it is then. tools/gpu_check.sh unpacks them with dpkg -x
# into a prefix under /tmp, never into /. Open MPI is left out: the device check builds with
# AVIARY_MPI=OFF (NCCL is the GPU engine). Idempotent: files already there are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${AVIARY_GPU_DIR:-.gpu}
log() { printf '[gpu_prepare] %s\n' "$*"; }

# The -dev packages of tools/setup.sh that the CUDA build links (no MPI, no google-benchmark), and
# pkgconf (cmake's pkg_check_modules for sentencepiece and re2).
ROOTS=(libspdlog-dev libfmt-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev
  libsentencepiece-dev libre2-dev libgtest-dev libgmock-dev pkgconf-bin)
# On every Debian/Ubuntu image with a C++ compiler, or not needed to build (catch2 and googletest
# are test frameworks' sources that the -dev packages merely recommend to depend on).
BASE_RE='^(libc6|libgcc-s1|libstdc\+\+6|gcc-[0-9]+-base|libc-dev|libc6-dev|catch2|googletest|dpkg|debconf|zlib1g|perl-base)$'

command -v apt-get >/dev/null || { log "error: apt-get not found: run this on the Debian CPU machine"; exit 1; }

# Direct Depends/PreDepends of a package, first alternative of each, virtual markers stripped.
depends_of() {
  apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "$1" 2>/dev/null |
    awk '/^  (Pre)?Depends:/ { gsub(/[<>]/, "", $2); print $2 }' | sed 's/:any$//' | sort -u
}

# The closure of ROOTS under Depends, minus the base system.
declare -A seen=()
queue=("${ROOTS[@]}")
packages=()
while ((${#queue[@]})); do
  p=${queue[0]}
  queue=("${queue[@]:1}")
  [[ -n "${seen[$p]:-}" ]] && continue
  seen[$p]=1
  [[ "$p" =~ $BASE_RE ]] && continue
  if ! apt-cache show "$p" >/dev/null 2>&1; then
    log "error: package $p is not known to apt (run apt-get update, or fix ROOTS in $0)"
    exit 1
  fi
  packages+=("$p")
  while read -r d; do
    [[ -n "$d" && -z "${seen[$d]:-}" ]] && queue+=("$d")
  done < <(depends_of "$p")
done

mkdir -p "$OUT_DIR"
log "packages (${#packages[@]}): ${packages[*]}"
(
  cd "$OUT_DIR"
  missing=()
  for p in "${packages[@]}"; do
    v=$(apt-cache policy "$p" | awk '/Candidate:/ { print $2 }')
    have=("${p}_"*.deb)
    f=${have[0]}
    [[ -e "$f" ]] || f=""
    # dpkg file names escape the epoch colon as %3a.
    if [[ -z "$f" || "$f" != "${p}_${v/:/%3a}_"* ]]; then
      rm -f "${p}_"*.deb
      missing+=("$p")
    fi
  done
  if ((${#missing[@]})); then
    log "downloading ${#missing[@]} .deb files into $OUT_DIR"
    apt-get download -q "${missing[@]}"
  fi
)
{
  echo "# Debian packages for tools/gpu_check.sh, made by tools/gpu_prepare.sh on $(date -u +%F)"
  echo "# name version file"
  for p in "${packages[@]}"; do
    have=("$OUT_DIR/${p}_"*.deb)
    f=$(basename "${have[0]}")
    v=$(dpkg-deb -f "$OUT_DIR/$f" Version)
    echo "$p $v $f"
  done
} >"$OUT_DIR/packages.txt"
# Anything else in the folder (an older version's .deb) would be unpacked too: drop it.
for f in "$OUT_DIR"/*.deb; do
  grep -q " $(basename "$f")\$" "$OUT_DIR/packages.txt" || { log "removing stale $f"; rm -f "$f"; }
done
# The tree these packages travel with: the report warns, and validates nothing, when the commit
# checked is not HEAD or the tree has uncommitted changes (they would be checked, not the commit).
{
  git rev-parse HEAD 2>/dev/null || echo unknown
  git status --short --untracked-files=normal 2>/dev/null | grep -v " $OUT_DIR/" || true
} >"$OUT_DIR/tree.txt"
log "$(grep -vc '^#' "$OUT_DIR/packages.txt") packages, $(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR"
log "next: the device call, with carry [\"$OUT_DIR\"]: tools/gpu_check.sh (docs/kernels.md)"
