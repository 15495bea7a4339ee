#!/bin/sh
# Like upstream's docker/entrypoint.sh for `server`: the same defaults before the caller's flags
# (later flags win), except -master.volumePreallocate, which only reserves disk space. Weed itself
# makes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY the S3 gateway's admin identity.
set -e
if [ "$1" = server ]; then
    shift
    defaults="-dir=/data -master.volumeSizeLimitMB=1024"
    case " $* " in
        *" -volume.max="* | *" -volume.max "*) ;;
        *) defaults="$defaults -volume.max=0" ;;
    esac
    # shellcheck disable=SC2086
    exec /usr/bin/weed server $defaults "$@"
fi
exec /usr/bin/weed "$@"
