#!/bin/bash
# The first process of a local sandbox, started by the supervisor (inside bubblewrap
# unless NAMEK_LOCAL_ISOLATION=off). It starts the screen server, the socket forwarders
# and Chromium, restarts Chromium when it dies, keeps the shell's tmux server running,
# and reports on stdout in lines that start with "NAMEK ". When the screen server or a
# forwarder dies, it exits, and with it the whole sandbox.
#
# Under bubblewrap it runs as root with only CAP_SETUID, CAP_SETGID and CAP_SETPCAP (to
# become the unprivileged users and drop the rest): it cannot even enter their private
# directories, so it opens its logs in its own "logs" directory before anything runs.
#
# Environment (set by the supervisor): SBX (the sandbox dir), DISPLAY_NUM, WIDTH, HEIGHT,
# CDP_PORT, START_URL, CHROMIUM, SCREEN_SERVER (xvnc or xvfb-x11vnc),
# SCREEN_UID/USER_UID/FORWARDER_UID (empty: stay who we are), FORWARD_PORT (empty: no
# forwarder to Namek's internal URL), TMUX_CONF (the shell's tmux configuration).
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

# The logs are opened once, now, in a directory no sandbox user can write: a path the
# browser user controls could be its symlink to a file it must not write.
exec 3>>"$SBX/logs/chromium.log" 4>>"$SBX/logs/socat.log" 5>>"$SBX/logs/xvnc.log"

wait_for_display() {
	for _ in $(seq 100); do
		[ -S "/tmp/.X11-unix/X$DISPLAY_NUM" ] && return
		sleep 0.05
	done
}

if [ "$SCREEN_SERVER" = "xvfb-x11vnc" ]; then
	# The Kubernetes pod's layout: an X server, and a VNC server that polls it. x11vnc
	# always listens on TCP too: -listen keeps that on loopback (-localhost would also
	# refuse the UNIX socket's peers, which have no address). -nonap: its idle naps
	# stalled one cold start in three by a second or more (tests/benchmarks/platform_bench).
	(as "$SCREEN_UID" Xvfb ":$DISPLAY_NUM" -screen 0 "${WIDTH}x${HEIGHT}x24" -nolisten tcp \
		>&5 2>&1 3>&- 4>&- 5>&-) &
	screen_pid=$!
	wait_for_display
	(as "$SCREEN_UID" x11vnc -display ":$DISPLAY_NUM" -unixsock "$SBX/screen/vnc.sock" \
		-rfbport 0 -listen 127.0.0.1 -noipv6 -rfbauth "$SBX/screen/passwd" -forever -shared \
		-desktop "namek" -nonap -quiet >&5 2>&1 3>&- 4>&- 5>&-) &
	screen_pid="$screen_pid $!"
else
	(as "$SCREEN_UID" Xvnc ":$DISPLAY_NUM" -geometry "${WIDTH}x${HEIGHT}" -depth 24 \
		-rfbport -1 -rfbunixpath "$SBX/screen/vnc.sock" -rfbunixmode 0600 \
		-SecurityTypes VncAuth -PasswordFile "$SBX/screen/passwd" -AlwaysShared -nolisten tcp \
		-desktop "namek" >&5 2>&1 3>&- 4>&- 5>&-) &
	screen_pid=$!
	wait_for_display
fi

# The forwarders run as a user of their own: as the browser user, that user could replace
# the CDP socket with a symlink to another sandbox's, which Namek would then dial.
(as "$FORWARDER_UID" socat "UNIX-LISTEN:$SBX/cdp/cdp.sock,fork,mode=600" "TCP:127.0.0.1:$CDP_PORT" \
	2>&4 3>&- 4>&- 5>&-) &
pids="$screen_pid $!"
if [ -n "$FORWARD_PORT" ]; then
	(as "$FORWARDER_UID" socat "TCP-LISTEN:$FORWARD_PORT,bind=127.0.0.1,fork,reuseaddr" \
		"UNIX-CONNECT:$SBX/namek.sock" 2>&4 3>&- 4>&- 5>&-) &
	pids="$pids $!"
fi

# The shell: a tmux server as the browser user, on the sandbox's display, whose socket
# Namek's web processes attach tmux clients to (root may connect to any user's server).
# -D keeps it in the foreground, so that it is started again if it ever ends; the
# configuration creates the session (in HOME) and respawns the shell when it exits.
(
	while true; do
		(as "$USER_UID" env HOME="$SBX/home" TMPDIR=/tmp DISPLAY=":$DISPLAY_NUM" SHELL=/bin/bash \
			TERM=tmux-256color tmux -D -S "$SBX/tmux/tmux.sock" -f "$TMUX_CONF" >&6 2>&1 6>&-)
		say shell-exit $?
		sleep 0.5
	done
) 3>&- 4>&- 5>&- 6>>"$SBX/logs/tmux.log" &

(
	while true; do
		started=$SECONDS
		# A claimed warm sandbox gets its start page later, in this file (root's).
		url=$START_URL
		[ -f "$SBX/start_url" ] && url=$(cat "$SBX/start_url")
		(as "$USER_UID" env HOME="$SBX/home" TMPDIR=/tmp DISPLAY=":$DISPLAY_NUM" "$CHROMIUM" \
			--no-sandbox --test-type --no-first-run --no-default-browser-check \
			--disable-background-networking --disable-component-update --disable-sync \
			--disable-gpu --disable-dev-shm-usage --disable-features=Translate,MediaRouter \
			--password-store=basic --remote-debugging-address=127.0.0.1 \
			--remote-debugging-port="$CDP_PORT" --user-data-dir="$SBX/home/profile" \
			--window-position=0,0 --window-size="$WIDTH,$HEIGHT" --start-maximized \
			"$url" >&3 2>&1 3>&- 4>&- 5>&-)
		code=$?
		say chromium-exit $code
		# Back off when Chromium cannot stay up (a broken install fails at once).
		if [ $((SECONDS - started)) -lt 10 ]; then sleep 3; else sleep 0.5; fi
	done
) &
say started

wait -n $pids
say screen-or-forwarder-exit $?
exit 1
