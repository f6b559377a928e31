# Sourced by scripts/bench-peers.sh and scripts/interop.sh: a Python virtual environment at $1
# with the packages pinned in $2 (set up once; checked by importing $3), then the release spiel
# binary in $SPIEL.
peers_env() {
    local venv=$1 requirements=$2 check=$3
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import $check" 2>/dev/null; then
        echo "setting up $venv ($check; a few GB) ..." >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q -r "$requirements"
    fi
}
cargo build --release --bin spiel
SPIEL=target/release/spiel
