# Sourced by the scripts beside it: `backports PACKAGE` makes Debian's bookworm-backports (binary
# and source packages) available to apt unless PACKAGE already has a backports version there.
# The development machines can reach it but do not list it.
backports() {
    local sudo=
    [[ $(id -u) == 0 ]] || sudo=sudo
    [[ $(apt-cache policy "$1") == *bpo12* ]] && return 0
    $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SRC'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $sudo apt-get update -q
}
