#!/usr/bin/env bash
# Build xenmig_<version>_amd64.deb with cargo-deb: the release binary, man
# pages and bash/zsh/fish completions generated from the clap definitions
# (`xenmig assets`), the example /etc/xenmig/xenmig.yaml (a conffile), the
# xend hook, README and docs. Then lintian (tags kept are explained in
# docs/packaging.md).
#
#   scripts/package.sh            -> target/debian/xenmig_<version>-1_amd64.deb
#
# Installs cargo-deb (pinned) from crates.io and lintian from apt when
# missing. Test the result with scripts/test-package.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
target=${CARGO_TARGET_DIR:-target}
if [ "$(cargo deb --version 2>/dev/null | awk '{print $NF}')" != "$CARGO_DEB_VERSION" ]; then
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

cargo build --release
# cargo-deb reads the assets from ./target/deb-assets (paths in Cargo.toml).
rm -rf target/deb-assets
mkdir -p target/deb-assets
# A stripped copy (the release profile keeps line tables for backtraces;
# cargo's own binary is left as it is).
cp "$target/release/xenmig" target/deb-assets/xenmig
strip --strip-unneeded target/deb-assets/xenmig
target/deb-assets/xenmig assets target/deb-assets
# Debian wants man pages compressed, reproducibly (no name or time stamp).
gzip -9n target/deb-assets/man/*.1

# cargo-deb maps asset paths under target/ to its own target dir: make
# that ./target, where the binary and the generated assets are.
deb=$(env -u CARGO_TARGET_DIR cargo deb --no-build --output target/debian/ | tail -1)
echo "built $deb"

if ! command -v lintian >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian >/dev/null
    else
        echo "lintian is not installed: skipped (apt install lintian)" >&2
        exit 0
    fi
fi
# Tags we keep are explained in docs/packaging.md; anything else is new.
lintian --info --suppress-tags-from-file packaging/lintian-explained "$deb" || true
