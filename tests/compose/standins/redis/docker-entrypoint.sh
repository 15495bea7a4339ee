#!/bin/sh
# Like the official image's entrypoint: `redis-server ...` (also `-...` or `*.conf` as first
# argument) runs as the redis user, owning /data; any other command is executed as given.
set -e
case "$1" in
    -* | *.conf) set -- redis-server "$@" ;;
esac
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
