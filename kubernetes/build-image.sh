#!/usr/bin/env bash
# `make image`: the ParM services image, built without any container registry.
#
#   1. base: a Debian bookworm minbase (python3, venv) made with mmdebstrap
#      (debootstrap when mmdebstrap is missing) from the Debian mirror and
#      imported with `podman import` as $BASE (skipped when it exists);
#   2. wheelhouse: the project's wheel and every serving dependency, built by
#      this checkout's Python (same minor version as the base: 3.11);
#   3. `podman build --network=none` of kubernetes/Containerfile over them.
#
# podman runs with kubernetes/containers.conf (runc, ulimits this machine
# allows) unless CONTAINERS_CONF is already set. Scratch files live in
# $WORK (build/image) and the base tarball is removed once imported.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/parm:0.1.0}
BASE=${BASE:-localhost/parm-base:bookworm}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-build/image}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
PACKAGES=python3,python3-venv,ca-certificates,libgomp1,netbase
# the project's extras in the image: ONNX Runtime (CPU), datasets (load
# generator), boto3 (s3:// model artifacts)
EXTRAS=cpu,data,deploy
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/kubernetes/containers.conf}

die() { echo "make image: $*" >&2; exit 1; }
command -v podman >/dev/null || die "podman not found (apt-get install podman runc mmdebstrap)"

mkdir -p "$WORK"
if ! podman image exists "$BASE"; then
    tarball=$WORK/base.tar
    trap 'rm -f "$tarball"; rm -rf "$WORK/rootfs"' EXIT
    if command -v mmdebstrap >/dev/null; then
        mmdebstrap --variant=minbase --include="$PACKAGES" \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            bookworm "$tarball" \
            "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
            "deb $DEBIAN_SECURITY bookworm-security main"
    elif command -v debootstrap >/dev/null; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include="$PACKAGES" bookworm "$WORK/rootfs" "$DEBIAN_MIRROR"
        tar -C "$WORK/rootfs" -cf "$tarball" .
    else
        die "neither mmdebstrap nor debootstrap found"
    fi
    podman import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE"
    rm -f "$tarball"
fi

base_py=$(podman run --rm --network=none "$BASE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
here_py=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$base_py" = "$here_py" ] || die "the base has Python $base_py, $PY is $here_py: the wheels would not install"

rm -rf "$WORK/wheels" "$WORK/bin"
"$PY" -m pip wheel --quiet --wheel-dir "$WORK/wheels" ".[$EXTRAS]" 2> >(grep -v '^WARNING: Location' >&2)
# Environment markers are evaluated for the base's Python, not this one
# (redis needs async-timeout below 3.11.3; Debian 12 has 3.11.2).
target_env=$(podman run --rm --network=none "$BASE" python3 -c "$("$PY" -c 'import sys; sys.path.insert(0, "kubernetes"); import wheelhouse; print(wheelhouse.ENV_SCRIPT)')")
"$PY" kubernetes/wheelhouse.py "$WORK/wheels" "$target_env" "$EXTRAS" 2> >(grep -v '^WARNING: Location' >&2)
cp -r kubernetes/bin "$WORK/bin"
old_id=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --network=none --build-arg "BASE=$BASE" --build-arg "EXTRAS=$EXTRAS" -f kubernetes/Containerfile -t "$IMAGE" "$WORK"
rm -rf "$WORK/wheels" "$WORK/bin"
# the image this build replaced, now untagged (kept if a container uses it)
new_id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
podman image inspect --format '{{.Id}} {{.Size}}' "$IMAGE" | awk -v img="$IMAGE" '{printf "make image: %s %s (%.0f MB)\n", img, substr($1, 1, 12), $2 / 1e6}'
