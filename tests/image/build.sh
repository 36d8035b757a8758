#!/usr/bin/env bash
# Build the Dockerfile with podman on a machine that has no container registry and no
# Docker daemon, for `make image-test`. Usage: tests/image/build.sh IMAGE
#
# The Dockerfile's base image cannot be pulled here, so a stand-in with the same name is
# made once from Debian bookworm with its python3 (3.11, as in the base image) and kept
# in podman's storage; later runs reuse it. The Dockerfile itself is built unchanged.
set -euo pipefail
cd "$(dirname "$0")/../.."

image=${1:?usage: tests/image/build.sh IMAGE}

if [ "$(id -u)" != 0 ]; then
	echo "make image-test needs root (podman storage, debootstrap and chroot);" \
		"elsewhere build the image with: docker build -t outbox ." >&2
	exit 1
fi

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
	echo "installing ${missing[*]}"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
		{ echo "could not install ${missing[*]}" >&2; exit 1; }
fi

# The name the Dockerfile's FROM lines use, as podman stores it.
base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile | sort -u)
if [ "$(wc -l <<<"$base")" != 1 ]; then
	echo "expected every FROM in Dockerfile to name one image, found: $base" >&2
	exit 1
fi
case $base in
*/*) ;;
*) base=docker.io/library/$base ;;
esac

if ! podman image exists "$base"; then
	echo "making a stand-in for $base with debootstrap (once; podman keeps it)"
	root=$(mktemp -d)
	trap 'rm -rf "$root"' EXIT
	debootstrap --variant=minbase \
		--include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
		bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 ||
		{ tail -20 "$root.log" >&2; exit 1; }
	rm -f "$root.log"
	rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
	# The environment the official image sets, which podman would not set on its own.
	tar -C "$root" -c . | podman import --quiet \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV LANG=C.UTF-8' \
		--change 'CMD ["python3"]' \
		- "$base" >/dev/null
	rm -rf "$root"
	trap - EXIT
fi

# pip in the build checks PyPI's certificate against the bundle this machine trusts
# (where PyPI is reached through a TLS-inspecting proxy, only that bundle has its CA);
# it is mounted over the image's own for the RUN steps only, never copied in.
# --format docker: the OCI image format has no HEALTHCHECK.
cafile=$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().cafile)')
log=$(mktemp)
podman build --format docker --isolation chroot --pull=never \
	--volume "$cafile:$cafile:ro" --tag "$image" --file Dockerfile . >"$log" 2>&1 ||
	{ tail -40 "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"

size=$(podman image inspect --format '{{.Size}}' "$image")
base_size=$(podman image inspect --format '{{.Size}}' "$base")
echo "built $image: $((size / 1000000)) MB, of which $(((size - base_size) / 1000000)) MB on top of $base"
