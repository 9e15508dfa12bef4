#!/usr/bin/env bash
# One GPU lease, one call: the SD1.5-size benchmarks (random weights) and the shipped workflows in the host's
# executor, all on the GPU. Sized to end inside ~8.5 minutes on an H100/H200; logs go to $OUT.
#
# Beside the repository it needs two folders that git ignores (list them in .git/info/exclude) and that the
# call carries: .gpu/host, a ComfyUI checkout without its .git (and without the tokenizers of models not
# built here), and .whl, wheels of the host's requirements the GPU image lacks (see bench/README.md).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
START=$SECONDS
left() { echo $(( ${BUDGET:-530} - (SECONDS - START) )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install"; exit 1; }
export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.gpu/host PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$OUT/gpu.txt"

bench() {   # bench NAME... : run_all on those benchmarks, within what is left of the budget
    local budget; budget=$(left)
    (( budget > 30 )) || { echo "skipped $* (no time left)" | tee -a "$OUT/bench.txt"; return; }
    timeout "$budget" python3 bench/run_all.py --device cuda --sd15 --no-tiny --timeout 300 --only "$@" 2>&1 \
        | tee -a "$OUT/bench.txt"
}

workflows() {   # the shipped workflows (tiny models) in the host's executor on the GPU
    local budget; budget=$(left); (( budget > 120 )) && budget=120
    PERSONALIZE_HOST_DEVICE=cuda timeout "$budget" python3 -m pytest tests/host -q -p no:cacheprovider -rfE \
        --tb=short -k "host_executor or requeueing" > "$OUT/workflows.txt" 2>&1
    tail -5 "$OUT/workflows.txt"
}

# arguments: the steps to run, e.g. workflows "bench pnd palp"; none: all, most wanted first
if (( $# )); then for step in "$@"; do $step; done
else bench pnd palp lnr; workflows; bench nti capture checkpointing; fi
echo "gpu_run.sh: $(( SECONDS - START )) s"
