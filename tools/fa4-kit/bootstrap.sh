# Sourced at the start of a command on the GPU machine (bash), after stash.sh ran in the call before:
#   source .fa4-kit/two/bootstrap.sh && python3 -m pytest ... --backend flash-attn4
# Joins the two parts, unpacks them once per machine into /tmp/fa4-site, and puts it, the DSL's
# packages (the meta wheel's .pth does not run from PYTHONPATH) and the project's root on PYTHONPATH.
_kit=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_root=$(cd "$_kit/../.." && pwd)
if [ ! -e /tmp/fa4-site/.ready ]; then
  if [ ! -e /tmp/fa4-parts/site.tar.xz.00 ]; then
    echo "fa4-kit: part one is not in /tmp/fa4-parts: run 'bash .fa4-kit/one/stash.sh' (carry .fa4-kit/one) in the call just before"
    return 1
  fi
  cp "$_kit"/site.tar.xz.* /tmp/fa4-parts/ && mkdir -p /tmp/fa4-site \
    && cat /tmp/fa4-parts/site.tar.xz.* | xz -d | tar -x -C /tmp/fa4-site && touch /tmp/fa4-site/.ready || return 1
fi
export PYTHONPATH="$_root:/tmp/fa4-site:/tmp/fa4-site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 - <<'PY' || return 1
import importlib.metadata as md
import torch, cutlass, flash_attn.cute  # noqa: F401
print(f"fa4-kit: torch {torch.__version__}, flash-attn-4 {md.version('flash-attn-4')}, "
      f"nvidia-cutlass-dsl {md.version('nvidia-cutlass-dsl')}, {torch.cuda.get_device_name()} "
      f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
PY
