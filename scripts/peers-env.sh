# Sourced by scripts/bench-peers.sh, scripts/bench-serve-peers.sh and scripts/interop.sh: a Python
# virtual environment at $1 with the packages pinned in $2 (set up once; checked by importing $3),
# the release spiel binary in $SPIEL, and peers_model DIR (the default model exported there).
peers_env() {
    local venv=$1 requirements=$2 check=$3
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import $check" 2>/dev/null; then
        echo "setting up $venv ($check; a few GB) ..." >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q -r "$requirements"
    fi
}
# The default model as a Hugging Face directory at $1 for the peers (exported once).
peers_model() {
    if [ ! -f "$1/config.json" ]; then
        "$SPIEL" export "$1"
    fi
}
cargo build --release --bin spiel
SPIEL=target/release/spiel
