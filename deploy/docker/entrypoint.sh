#!/bin/sh
# The loraserve container's entrypoint: LoRAX's container environment in, `loraserve serve` out.
#
#   docker run IMAGE                        -> loraserve serve
#   docker run IMAGE --model-id X --quantize int8
#                                           -> loraserve serve --model-id X --quantize int8
#   docker run IMAGE generate "Hello"       -> loraserve generate "Hello"
#   docker run IMAGE serve --port 8080      -> loraserve serve --port 8080
#   docker run -it IMAGE sh                 -> sh (any other command runs as given, for debugging)
#
# loraserve itself reads every launcher flag's LoRAX environment variable (MODEL_ID, PORT, ADAPTER_SOURCE,
# MAX_INPUT_LENGTH, ...; see loraserve/config.py FLAG_ENV), so this script only does what a container needs:
#   - binds to every interface (LORASERVE_HOSTNAME=0.0.0.0) unless LORASERVE_HOSTNAME or --hostname says otherwise;
#   - maps LoRAX's other names: HUGGING_FACE_HUB_TOKEN / HF_API_TOKEN -> HF_TOKEN, DEFAULT_ADAPTER_SOURCE ->
#     ADAPTER_SOURCE (LoRAX's default source for adapters named by requests);
#   - checks that the cache (LORASERVE_CACHE, /data in the image) and HF_HOME are writable, and says how to fix it
#     when they are not, before any model is loaded;
#   - execs loraserve, so it is PID 1 and receives SIGTERM.
set -eu

prog=loraserve-entrypoint

die() {
    printf '%s: error: %s\n' "${prog}" "$*" >&2
    exit 1
}

warn() {
    printf '%s: warning: %s\n' "${prog}" "$*" >&2
}

# --- LoRAX's environment names --------------------------------------------------------------------------------------
if [ -z "${HF_TOKEN:-}" ]; then
    if [ -n "${HUGGING_FACE_HUB_TOKEN:-}" ]; then
        HF_TOKEN=${HUGGING_FACE_HUB_TOKEN}
        export HF_TOKEN
    elif [ -n "${HF_API_TOKEN:-}" ]; then
        HF_TOKEN=${HF_API_TOKEN}
        export HF_TOKEN
    fi
fi
if [ -n "${DEFAULT_ADAPTER_SOURCE:-}" ]; then
    # LoRAX: --default-adapter-source wins over --adapter-source for the adapters that requests name
    ADAPTER_SOURCE=${DEFAULT_ADAPTER_SOURCE}
    export ADAPTER_SOURCE
fi

# --- bind address: every interface inside a container --------------------------------------------------------------
if [ -z "${LORASERVE_HOSTNAME:-}" ]; then
    LORASERVE_HOSTNAME=0.0.0.0
    export LORASERVE_HOSTNAME
fi

# --- what to run ----------------------------------------------------------------------------------------------------
if [ "${1:-}" = loraserve ]; then
    shift  # `docker run IMAGE loraserve serve ...` means the same as `docker run IMAGE serve ...`
fi
if [ "$#" -eq 0 ]; then
    set -- serve
else
    case "$1" in
        serve | generate) ;;
        -*) set -- serve "$@" ;;
        *) exec "$@" ;;  # not a loraserve command: run it as given (a shell, python, ...)
    esac
fi

# --- the cache must be writable -------------------------------------------------------------------------------------
cache=${LORASERVE_CACHE:-/data}
LORASERVE_CACHE=${cache}
export LORASERVE_CACHE
if [ -z "${HF_HOME:-}" ]; then
    HF_HOME=${cache}/huggingface
    export HF_HOME
fi

uid=$(id -u)
gid=$(id -g)
who="uid ${uid}, gid ${gid}"
hint="Mount a volume there that this user can write (docker run -v loraserve-data:${cache}; for a host folder, chown \
${uid} it; on Kubernetes, securityContext.fsGroup: ${gid}), or point LORASERVE_CACHE at a writable folder."
check_writable() {  # $1: directory, $2: what it is
    if ! mkdir -p "$1" 2>/dev/null; then
        die "cannot create $2 $1 as ${who}. ${hint}"
    fi
    probe="$1/.loraserve-write-test.$$"
    if ! (: >"${probe}") 2>/dev/null; then
        die "$2 $1 is not writable as ${who}. ${hint}"
    fi
    rm -f "${probe}"
}
check_writable "${cache}" "the cache directory (LORASERVE_CACHE)"
check_writable "${HF_HOME}" "the Hugging Face home (HF_HOME)"

# --- a privileged port without the right to bind it -----------------------------------------------------------------
if [ "$1" = serve ] && [ "${uid}" != 0 ]; then
    case " $* " in
        *" --port "* | *" --port="*) ;;  # the flag decides; the server reports a bind failure itself
        *)
            port=${PORT:-3000}
            floor_file=${LORASERVE_UNPRIVILEGED_PORT_FILE:-/proc/sys/net/ipv4/ip_unprivileged_port_start}
            floor=
            if [ -r "${floor_file}" ]; then
                floor=$(cat "${floor_file}")
            fi
            case "${port}" in "" | *[!0-9]*) port= ;; *) ;; esac
            case "${floor}" in "" | *[!0-9]*) floor= ;; *) ;; esac
            if [ -n "${port}" ] && [ -n "${floor}" ] && [ "${port}" -lt "${floor}" ]; then
                warn "PORT=${port} is below net.ipv4.ip_unprivileged_port_start=${floor}, so ${who} may not bind \
it: set PORT=3000 (and publish that port), or the sysctl net.ipv4.ip_unprivileged_port_start=0 (Docker's default; a \
safe sysctl on Kubernetes)."
            fi
            ;;
    esac
fi

exec loraserve "$@"
