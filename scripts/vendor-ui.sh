#!/usr/bin/env bash
# Refresh the chat page's vendored libraries (ds4tw/_server/ui/page/vendor/) from
# npm: the pinned versions below, each package's own ES module build and
# license files, copied unmodified (so anyone can check them against the
# npm tarball), and vendor/VERSIONS saying what came from where. Run it by
# hand to upgrade (change a version, run, test, commit); nothing at build or
# run time needs npm: the page works offline with no build step.
set -euo pipefail
MARKED=18.2.1
DOMPURIFY=3.4.18
cd "$(dirname "$0")/.."
dest=ds4tw/_server/ui/page/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() { # NAME VERSION FILE... : npm pack NAME@VERSION, copy FILEs from it
    local name=$1 version=$2
    shift 2
    mkdir -p "$tmp/$name"
    (cd "$tmp/$name" && npm pack --silent "$name@$version" >/dev/null && tar xzf ./*.tgz)
    for f in "$@"; do
        cp "$tmp/$name/package/${f%%=*}" "$dest/${f#*=}"
    done
    printf '%s@%s %s\n' "$name" "$version" "$(npm view "$name@$version" dist.integrity)" >>"$tmp/VERSIONS"
}

mkdir -p "$dest"
fetch marked "$MARKED" lib/marked.esm.js=marked.esm.js LICENSE=marked.LICENSE
fetch dompurify "$DOMPURIFY" dist/purify.es.mjs=purify.es.mjs \
    LICENSE=dompurify.LICENSE LICENSE-MPL=dompurify.LICENSE-MPL
{
    echo "# Vendored by scripts/vendor-ui.sh, unmodified: package@version and npm's dist.integrity."
    cat "$tmp/VERSIONS"
    echo "# sha256 of each file as vendored:"
    (cd "$dest" && sha256sum -- *.js *.mjs *.LICENSE*)
} >"$dest/VERSIONS"
echo "vendored into $dest:"
cat "$dest/VERSIONS"
