#!/bin/sh
# Install indibroker as a service: a virtual environment of its own (PEP 668 systems such as
# Debian 12, Ubuntu 24.04 and Raspberry Pi OS refuse pip in the system Python), a service user,
# the config in /etc/indibroker, the docs, and the systemd unit pointing at the real command.
#
#   sudo deploy/install.sh            # from a checkout; run again to upgrade (config kept)
#
# Where things go can be changed (the tests install into a scratch directory this way):
#   PREFIX=/opt/indibroker  ETC_DIR=/etc/indibroker  UNIT_DIR=/etc/systemd/system
#   DOC_DIR=/usr/share/doc/indibroker  SERVICE_USER=indi  STATE_DIR=/var/lib/indi
#   NO_USER=1 (do not create the user)  NO_SYSTEMD=1 (do not reload or enable the unit)
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/indibroker}
ETC_DIR=${ETC_DIR:-/etc/indibroker}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
DOC_DIR=${DOC_DIR:-/usr/share/doc/indibroker}
SERVICE_USER=${SERVICE_USER:-indi}
STATE_DIR=${STATE_DIR:-/var/lib/indi}
PYTHON=${PYTHON:-python3}

say() { printf 'indibroker install: %s\n' "$*"; }

if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    say "$PYTHON cannot make a virtual environment: install python3-venv first (apt-get install -y python3-venv)"
    exit 1
fi

# The program: its own environment, upgraded in place when run again.
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --upgrade "$SRC"
say "installed $("$PREFIX/bin/indibroker" --version) in $PREFIX"

# The service user: its home (where libindi drivers keep ~/.indi) is under /var/lib, outside
# what ProtectHome= hides; serial mounts and USB cameras need dialout, plugdev and video.
if [ -z "${NO_USER:-}" ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$STATE_DIR" --create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    for group in dialout plugdev video; do
        getent group "$group" >/dev/null && usermod -a -G "$group" "$SERVICE_USER"
    done
    say "created service user $SERVICE_USER (home $STATE_DIR)"
fi

# The config: never overwritten; checked before the service may use it.
mkdir -p "$ETC_DIR"
if [ ! -e "$ETC_DIR/indibroker.toml" ]; then
    cp "$SRC/deploy/indibroker.toml" "$ETC_DIR/indibroker.toml"
    say "wrote $ETC_DIR/indibroker.toml (edit it, then: $PREFIX/bin/indibroker check-config $ETC_DIR/indibroker.toml)"
fi
"$PREFIX/bin/indibroker" check-config "$ETC_DIR/indibroker.toml" ||
    say "fix $ETC_DIR/indibroker.toml before starting the service (the lines above say what)"

mkdir -p "$DOC_DIR"
cp "$SRC/README.md" "$DOC_DIR/"
cp -r "$SRC/docs/." "$DOC_DIR/"

# The unit, pointing at this install.
mkdir -p "$UNIT_DIR"
sed -e "s#@INDIBROKER@#$PREFIX/bin/indibroker#g" -e "s#@ETC_DIR@#$ETC_DIR#g" -e "s#@DOC_DIR@#$DOC_DIR#g" \
    -e "s#@USER@#$SERVICE_USER#g" "$SRC/deploy/indibroker.service" > "$UNIT_DIR/indibroker.service"
say "wrote $UNIT_DIR/indibroker.service"

if [ -z "${NO_SYSTEMD:-}" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable indibroker.service
    say "enabled at boot; start it now with: systemctl start indibroker"
else
    say "systemd is not running here: start it by hand with $PREFIX/bin/indibroker start --config $ETC_DIR/indibroker.toml"
fi
