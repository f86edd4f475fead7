#!/bin/bash
# The first process of a local sandbox, started by the supervisor (inside bubblewrap
# unless NAMEK_LOCAL_ISOLATION=off). It starts the screen server, the socket forwarders
# and Chromium, restarts Chromium when it dies, and reports on stdout in lines that
# start with "NAMEK ". When the screen server or a forwarder dies, it exits, and with it
# the whole sandbox.
#
# Environment (set by the supervisor): SBX (the sandbox dir), DISPLAY_NUM, WIDTH, HEIGHT,
# CDP_PORT, START_URL, CHROMIUM, SCREEN_UID/USER_UID (empty: stay who we are),
# FORWARD_PORT (empty: no forwarder to Namek's internal URL).
set -u

as() {  # as UID CMD...: run CMD as an unprivileged user, with every capability dropped
	local uid=$1
	shift
	if [ -n "$uid" ]; then
		exec setpriv --reuid="$uid" --regid="$uid" --clear-groups --inh-caps=-all --bounding-set=-all -- "$@"
	else
		exec "$@"
	fi
}

say() { echo "NAMEK $*"; }

(as "$SCREEN_UID" Xvnc ":$DISPLAY_NUM" -geometry "${WIDTH}x${HEIGHT}" -depth 24 \
	-rfbport -1 -rfbunixpath "$SBX/screen/vnc.sock" -rfbunixmode 0600 \
	-SecurityTypes VncAuth -PasswordFile "$SBX/screen/passwd" -AlwaysShared -nolisten tcp \
	-desktop "namek" >"$SBX/screen/xvnc.log" 2>&1) &
screen_pid=$!

for _ in $(seq 100); do
	[ -S "$SBX/screen/vnc.sock" ] && break
	sleep 0.05
done

(as "$USER_UID" socat "UNIX-LISTEN:$SBX/cdp/cdp.sock,fork,mode=600" "TCP:127.0.0.1:$CDP_PORT" \
	2>>"$SBX/home/socat.log") &
pids="$screen_pid $!"
if [ -n "$FORWARD_PORT" ]; then
	(as "$USER_UID" socat "TCP-LISTEN:$FORWARD_PORT,bind=127.0.0.1,fork,reuseaddr" \
		"UNIX-CONNECT:$SBX/namek.sock" 2>>"$SBX/home/socat.log") &
	pids="$pids $!"
fi

(
	while true; do
		(as "$USER_UID" env HOME="$SBX/home" TMPDIR=/tmp DISPLAY=":$DISPLAY_NUM" "$CHROMIUM" \
			--no-sandbox --test-type --no-first-run --no-default-browser-check \
			--disable-background-networking --disable-component-update --disable-sync \
			--disable-gpu --disable-dev-shm-usage --disable-features=Translate,MediaRouter \
			--password-store=basic --remote-debugging-address=127.0.0.1 \
			--remote-debugging-port="$CDP_PORT" --user-data-dir="$SBX/home/profile" \
			--window-position=0,0 --window-size="$WIDTH,$HEIGHT" --start-maximized \
			"$START_URL" >>"$SBX/home/chromium.log" 2>&1)
		say chromium-exit $?
		sleep 0.5
	done
) &
say started

wait -n $pids
say screen-or-forwarder-exit $?
exit 1
