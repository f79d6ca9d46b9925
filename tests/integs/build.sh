#!/usr/bin/env bash
# Build indilib 1.9.9's own server integration tests (integs/, gtest, by Ludovic Pollet) in two
# variants, for tests/integs/run.py:
#
#   $INTEGS_DIR/plain/integs/   the plain build (the test client connects over TCP)
#   $INTEGS_DIR/shm/integs/     -DENABLE_INDI_SHARED_MEMORY, what upstream builds on Linux (the
#                               test client connects over the local socket `-u`; three more
#                               cases: attached, shared-memory BLOBs)
#
# Run as root on Debian 12 (as CI does). Idempotent: every step is skipped when its result is
# already there. Sources: Debian's source package of indi 1.9.9 (the orig tarball, checked against
# its SHA-256), through a deb-src entry that this script adds when none is configured.
#
#   INTEGS_DIR        where to build (default /var/cache/indibroker-integs)
#   INDI_DEB_VERSION  Debian source version to fetch (default 1.9.9+dfsg-2)
#   INTEGS_NO_APT=1   never call apt-get (fail instead if something is missing)
#   INTEGS_FORCE=1    rebuild even if a build is there
set -euo pipefail

INTEGS_DIR=${INTEGS_DIR:-/var/cache/indibroker-integs}
INDI_DEB_VERSION=${INDI_DEB_VERSION:-1.9.9+dfsg-2}
ORIG=indi_1.9.9+dfsg.orig.tar.xz
ORIG_SHA256=37f288734a1c136d64b7203c7d8f9d95e423557c8c392318e2bd26bd5f6b52a4
SRC_TOP=indi-1.9.9
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACKAGES=(cmake make g++ libgtest-dev libindi-dev indi-bin xz-utils iproute2 util-linux)
APT_TIMEOUT=${APT_TIMEOUT:-900}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-900}
START=$(date +%s)
APT_UPDATED=0

log() { printf '[integs build %3ss] %s\n' "$(( $(date +%s) - START ))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

apt_update() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        timeout "$APT_TIMEOUT" apt-get update -q >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

have_deb_src() {
    # any deb-src entry (one-line or deb822 format) that is enabled
    grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

add_deb_src() {
    [[ $(id -u) == 0 ]] || die "no deb-src entry configured, and not root to add one"
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        # deb822: the same stanzas (URIs, suites, keys), as deb-src
        log "adding /etc/apt/sources.list.d/debian-src.sources (from debian.sources)"
        sed -E 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb-src/' \
            /etc/apt/sources.list.d/debian.sources > /etc/apt/sources.list.d/debian-src.sources
    elif grep -qsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then
        log "adding /etc/apt/sources.list.d/debian-src.list (from sources.list)"
        sed -nE 's/^[[:space:]]*deb[[:space:]]/deb-src /p' /etc/apt/sources.list \
            > /etc/apt/sources.list.d/debian-src.list
    else
        log "adding /etc/apt/sources.list.d/debian-src.sources (deb.debian.org bookworm)"
        cat > /etc/apt/sources.list.d/debian-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    APT_UPDATED=0
}

orig_ok() {
    [[ -f "$INTEGS_DIR/downloads/$ORIG" ]] &&
        echo "$ORIG_SHA256  $INTEGS_DIR/downloads/$ORIG" | sha256sum -c --status
}

mkdir -p "$INTEGS_DIR/downloads" "$INTEGS_DIR/src"

# A deb-src entry is added first (when the tarball is still to fetch), so one apt-get update serves both.
if ! orig_ok && [[ ${INTEGS_NO_APT:-0} != 1 ]] && ! have_deb_src; then
    add_deb_src
fi

# --- 1. packages --------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ ${INTEGS_NO_APT:-0} == 1 ]] && die "missing packages: ${missing[*]} (INTEGS_NO_APT=1)"
    [[ $(id -u) == 0 ]] || die "missing packages: ${missing[*]}; run as root (or apt-get install them)"
    apt_update
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive timeout "$APT_TIMEOUT" \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
else
    log "packages present: ${PACKAGES[*]}"
fi

# --- 2. the orig tarball of Debian's indi source package -----------------------------------------
if orig_ok; then
    log "source tarball present: $INTEGS_DIR/downloads/$ORIG"
else
    [[ ${INTEGS_NO_APT:-0} == 1 ]] && die "$ORIG missing and INTEGS_NO_APT=1"
    have_deb_src || add_deb_src
    if ! apt-get source --print-uris --tar-only "indi=$INDI_DEB_VERSION" 2>/dev/null | grep -q "$ORIG"; then
        apt_update   # deb-src present but its index not fetched yet
    fi
    log "apt-get source --download-only --tar-only indi=$INDI_DEB_VERSION (in $INTEGS_DIR/downloads)"
    # --tar-only: only the orig tarball (this mirror does not serve the .debian.tar.xz)
    if ! (cd "$INTEGS_DIR/downloads" &&
          timeout "$APT_TIMEOUT" apt-get source -q --download-only --tar-only "indi=$INDI_DEB_VERSION" >/dev/null 2>&1) \
       || ! orig_ok; then
        # fallback: apt's own downloader on the URI and hash that apt-get source resolves
        line=$(apt-get source --print-uris --tar-only "indi=$INDI_DEB_VERSION" 2>/dev/null | grep "$ORIG" | head -1)
        [[ -n $line ]] || die "apt-get source cannot resolve indi=$INDI_DEB_VERSION (deb-src configured?)"
        uri=$(sed -E "s/^'([^']+)'.*/\1/" <<<"$line")
        log "fallback: apt-helper download-file $uri"
        timeout "$APT_TIMEOUT" /usr/lib/apt/apt-helper download-file "$uri" \
            "$INTEGS_DIR/downloads/$ORIG" "SHA256:$ORIG_SHA256" >/dev/null \
            || die "download of $uri failed"
    fi
    orig_ok || die "$ORIG does not match SHA-256 $ORIG_SHA256"
    log "source tarball downloaded and verified (SHA-256 $ORIG_SHA256)"
fi

# --- 3. extract only what the integs need ---------------------------------------------------------
SRC="$INTEGS_DIR/src/$SRC_TOP"
if [[ -f "$SRC/.extracted-$ORIG_SHA256" ]]; then
    log "sources present: $SRC"
else
    log "extracting $SRC_TOP/integs and $SRC_TOP/libs/indicore/shm_open_anon.c"
    rm -rf "$SRC"
    tar -C "$INTEGS_DIR/src" -xJf "$INTEGS_DIR/downloads/$ORIG" \
        "$SRC_TOP/integs" "$SRC_TOP/libs/indicore/shm_open_anon.c" "$SRC_TOP/COPYING.LGPL"
    touch "$SRC/.extracted-$ORIG_SHA256"
fi

# --- 4. build both variants ---------------------------------------------------------------------
EXES=(fakedriver XmlAwaiterTest TestIndiserverSingleDriver TestClientQueries TestIndiSetProp TestIndiClient)
fingerprint() {  # what a build depends on: sources, our CMakeLists, toolchain, gtest, libindi
    {
        echo "$ORIG_SHA256 $1"
        cat "$HERE/CMakeLists.txt"
        g++ --version | head -1
        dpkg-query -W -f='${Version}\n' libgtest-dev libindi-dev
    } | sha256sum | cut -d' ' -f1
}

for variant in plain shm; do
    out="$INTEGS_DIR/$variant"
    fp=$(fingerprint "$variant")
    all=1
    for e in "${EXES[@]}"; do [[ -x "$out/integs/$e" ]] || all=0; done
    if [[ ${INTEGS_FORCE:-0} != 1 && $all == 1 && -f "$out/.fingerprint" && $(cat "$out/.fingerprint") == "$fp" ]]; then
        log "$variant: already built ($out/integs)"
    else
        shm=OFF; [[ $variant == shm ]] && shm=ON
        log "$variant: cmake (INTEGS_SHM=$shm) and build with $(nproc) jobs"
        rm -rf "$out"
        t0=$(date +%s)
        timeout "$BUILD_TIMEOUT" cmake -S "$HERE" -B "$out" -DINDI_SOURCE_DIR="$SRC" -DINTEGS_SHM=$shm \
            > "$INTEGS_DIR/$variant.cmake.log" 2>&1 \
            || { tail -30 "$INTEGS_DIR/$variant.cmake.log" >&2; die "$variant: cmake failed"; }
        timeout "$BUILD_TIMEOUT" cmake --build "$out" -j "$(nproc)" > "$INTEGS_DIR/$variant.build.log" 2>&1 \
            || { tail -40 "$INTEGS_DIR/$variant.build.log" >&2; die "$variant: build failed"; }
        for e in "${EXES[@]}"; do [[ -x "$out/integs/$e" ]] || die "$variant: $e was not built"; done
        echo "$fp" > "$out/.fingerprint"
        log "$variant: built in $(( $(date +%s) - t0 )) s"
    fi
    # The layout the tests expect around their working directory ($out/integs): the server at
    # ../indiserver/indiserver (run.py puts a wrapper there, in a per-run copy of this layout)
    # and ../tools/indi_setprop (Debian's, same version).
    mkdir -p "$out/tools" "$out/indiserver"
    ln -sfn "$(command -v indi_setprop)" "$out/tools/indi_setprop"
done

log "done: $INTEGS_DIR/{plain,shm}/integs (run: python3 $HERE/run.py --server /usr/bin/indiserver)"
