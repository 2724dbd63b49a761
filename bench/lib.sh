# Shared by the bench scripts (sourced, not run).

# The Python with PyTorch the peers run on: $TORCH_PYTHON, else a venv in .venv-bench
# (created with pip on first use; PyTorch is a large download).
torch_python() {
  if [[ -n "${TORCH_PYTHON:-}" ]]; then
    echo "$TORCH_PYTHON"
    return
  fi
  if [[ ! -x .venv-bench/bin/python ]]; then
    echo "creating .venv-bench with PyTorch (large download, once)..." >&2
    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -q torch numpy safetensors >&2
  fi
  echo .venv-bench/bin/python
}

# One line naming the machine, for the head of a benchmark's output.
machine_line() {
  echo "$(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
}
