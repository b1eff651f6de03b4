# Shared helpers of the project's scripts (sourced, not run).

# apt-get install the given Debian packages when any is missing (root, or sudo when available).
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo ">> installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/burn-moe-apt.log 2>&1; then
        $sudo apt-get update >>/tmp/burn-moe-apt.log 2>&1
        $sudo apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/burn-moe-apt.log 2>&1 || {
            echo "error: apt-get install ${missing[*]} failed; see /tmp/burn-moe-apt.log" >&2
            return 1
        }
    fi
}
