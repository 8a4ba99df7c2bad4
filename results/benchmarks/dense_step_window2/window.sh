# before (560e3e6, /work/wt_before) and after (a1e0b22, /work/wt_after) alternately, then the authors' algorithm
set -u
W=/work/runs/s41/window2
export LD_PRELOAD=libtcmalloc_minimal.so.4
echo "start $(date -u +%T)" > $W/times.txt
for r in 1 2 3 4 5; do
  (cd /work/wt_before && python -m benchmarks.outer_step mnist_fixed_init_paper mnist_fixed_init_100 mnist_random_init --iterations=50 > $W/before_$r.txt 2>&1)
  (cd /work/wt_after && python -m benchmarks.outer_step mnist_fixed_init_paper mnist_fixed_init_100 mnist_random_init --iterations=50 > $W/after_$r.txt 2>&1)
  echo "round $r $(date -u +%T)" >> $W/times.txt
done
cd /work/wt_after
for e in mnist_fixed_init_paper mnist_fixed_init_100 mnist_random_init; do
  it=50; [ $e = mnist_random_init ] && it=30
  LD_PRELOAD= /tmp/torchvenv/bin/python benchmarks/torch_reference.py --experiment=$e --iterations=$it > $W/torch_$e.txt 2>&1
  /tmp/torchvenv/bin/python benchmarks/torch_reference.py --experiment=$e --iterations=$it > $W/torch_tcmalloc_$e.txt 2>&1
done
echo "end $(date -u +%T)" >> $W/times.txt
