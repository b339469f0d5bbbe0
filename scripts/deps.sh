#!/usr/bin/env bash
# Installs what tandem needs on a fresh Debian 12 machine; a no-op when all is
# there. Needs: a Rust toolchain (cargo, rustfmt, clippy), gcc with 32-bit
# code generation, binutils (ld, objcopy), make, and /dev/kvm to run guests.
set -euo pipefail

missing=()
command -v gcc >/dev/null || missing+=(gcc)
command -v ld >/dev/null || missing+=(binutils)
command -v objcopy >/dev/null || missing+=(binutils)
command -v make >/dev/null || missing+=(make)
command -v ip >/dev/null || missing+=(iproute2)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v ping >/dev/null || missing+=(iputils-ping)
command -v nft >/dev/null || missing+=(nftables)
[ -x /usr/bin/python3 ] || missing+=(python3) # tests/security.rs: a client run as nobody
command -v protoc >/dev/null || missing+=(protobuf-compiler) # etcd-client's build compiles etcd's protobufs
# etcd: the etcd arbiter's tests run a 3-member cluster with TLS and auth.
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v openssl >/dev/null || missing+=(openssl)

if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "deps: need root to install ${missing[*]} (apt-get)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "deps: no cargo: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component" || echo "deps: warning: cannot add $component (make lint needs it)" >&2
    fi
done

if [ ! -e /dev/kvm ]; then
    echo "deps: warning: /dev/kvm does not exist; guests cannot run on this host" >&2
fi
