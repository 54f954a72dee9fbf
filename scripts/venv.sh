# Sourced by ./behemoth and ./test: make sure .venv exists and holds this project, then return.
# torch==2.13.0 is installed first, on its own: it is a CPU build on these machines, while an
# unpinned torch (or one pulled in by another package) would be a multi-GB CUDA download.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.behemoth-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

# llama-cpp-python (a test dependency) compiles llama.cpp: only the library, on both cores.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "Setting up $VENV (first use or pyproject.toml changed)..." >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  LOG="$VENV/install.log"
  {
    "$VENV/bin/python" -m pip install --upgrade pip &&
    "$VENV/bin/python" -m pip install "torch==2.13.0" &&
    "$VENV/bin/python" -m pip install -e "$ROOT[test]"
  } >"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; echo "setup failed; full log: $LOG" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
