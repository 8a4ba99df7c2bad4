#!/usr/bin/env bash
# The benchmarks of this directory in one go, on whatever device JAX picks (the GPU where the
# CUDA build of jaxlib is installed), each one's output in OUT/<part>.txt.
#
#   bash benchmarks/suite.sh OUT [PART ...]     # PARTs: speed torch n_nets memory fit tta cifar
#                                               # (default: all)
#
# Environment: ITERATIONS (speed, default 100), MAX_RUN_GB (memory: largest compiled step that is
# executed, default 3), FIT_N_NETS (fit: n_nets of mnist_random_init to try, default 64,256,1024),
# TTA (tta: experiment[:flags] runs separated by ';', default mnist_fixed_init), MINUTES (tta
# budget per run, default 10), EVERY (tta evaluation interval, default 500), TORCH_PYTHON (a
# python with torch, for the authors' algorithm: default python) and TORCH_DEVICE (default cpu).
# cifar times the CIFAR-10 experiments on tensorflow-datasets' mock data (random pixels of the
# real shapes; needs tensorflow-datasets), CIFAR_ITERATIONS of them (default 20).
set -u
out=${1:?usage: bash benchmarks/suite.sh OUT [speed torch n_nets memory fit tta cifar]}
shift
parts=${*:-speed torch n_nets memory fit tta cifar}
mkdir -p "$out"
cd "$(dirname "$0")/.."

run() {  # run PART COMMAND...: prints the command, then its output, also into OUT/PART.txt
  local part=$1
  shift
  echo "\$ $*" | tee -a "$out/$part.txt"
  "$@" 2>&1 | tee -a "$out/$part.txt"
}

for part in $parts; do
  case $part in
    speed)
      for conv in native toeplitz xla; do
        run speed python -m benchmarks.outer_step mnist_fixed_init mnist_fixed_init_100 \
          mnist_random_init --iterations="${ITERATIONS:-100}" --conv=$conv
      done ;;
    torch)  # the authors' algorithm in PyTorch, mnist_fixed_init, for the same-hardware ratio
      run torch "${TORCH_PYTHON:-python}" benchmarks/torch_reference.py \
        --iterations="${ITERATIONS:-100}" --device="${TORCH_DEVICE:-cpu}" ;;
    n_nets)
      run n_nets python -m benchmarks.n_nets --n_nets_list=1,4,16 --iterations=50 --budget_s=30 ;;
    memory)
      run memory python -m benchmarks.memory --T=30,100,300 --max_run_gb="${MAX_RUN_GB:-3}" ;;
    fit)  # mnist_random_init's meta-step (T=30, real batch 1024) with many nets: memory and time
      n_nets=${FIT_N_NETS:-64,256,1024}
      for n in ${n_nets//,/ }; do
        run fit python -m benchmarks.memory --child=1 --experiment=mnist_random_init --n_nets="$n" \
          --max_run_gb="${MAX_RUN_GB:-3}"
        run fit python -m benchmarks.outer_step mnist_random_init --n_nets="$n" --iterations=20
      done ;;
    tta)
      IFS=';' read -ra runs <<< "${TTA:-mnist_fixed_init}"
      for i in "${!runs[@]}"; do
        read -ra words <<< "${runs[$i]//:/ }"
        run tta python -m benchmarks.time_to_accuracy "${words[@]}" --minutes="${MINUTES:-10}" \
          --every="${EVERY:-500}" --out="$out/tta$i" --plot=1
      done ;;
    cifar)  # AlexCifarNet, T=30, real batch 1024: the pixel values do not change the work
      for conv in native toeplitz xla; do
        run cifar python -m benchmarks.outer_step cifar10_fixed_init cifar10_random_init \
          --iterations="${CIFAR_ITERATIONS:-20}" --mock_examples=2048 --conv=$conv
      done ;;
    *) echo "unknown part '$part' (speed torch n_nets memory fit tta cifar)" >&2; exit 2 ;;
  esac
done
