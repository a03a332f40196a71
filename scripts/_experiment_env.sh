# Sourced by the experiment scripts in scripts/ (not run on its own), after they set W (their workdir):
# PY as scripts/_venv.sh sets it, JAX on the CPU unless JAX_PLATFORMS says otherwise, quiet TensorFlow,
# and one persistent XLA cache in $W/.jax_cache, so the seeds of a cell compile once.

source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$W/.jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
