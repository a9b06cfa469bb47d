# Sourced by gpu_check.sh and gpu_smoke.sh: PY, the interpreter they run everything with, exported as PYTHON for the
# scripts they call. $PYTHON if set, else the first of `python`, `python3` that imports torch (a `python` that is
# another interpreter, a pyenv shim, has none).
PY=${PYTHON:-$(for py in python python3; do command -v $py > /dev/null && $py -c "import torch" 2> /dev/null &&
  { command -v $py; break; }; done)}
[[ -n $PY ]] || { echo "neither python nor python3 imports torch here: set PYTHON=/path/to/python"; exit 1; }
export PYTHON=$PY
