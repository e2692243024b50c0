H=${HYPERREF:-hyperref}
export OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
python3 - <<'P'
import numpy as np
np.savez("/tmp/cat_ok.npz", q=np.random.randn(8,4), k=np.random.randn(8,4), v=np.random.randn(8,4))
np.savez("/tmp/cat_nan.npz", q=np.full((8,4),np.nan), k=np.random.randn(8,4), v=np.random.randn(8,4))
np.savez("/tmp/cat_missing.npz", q=np.random.randn(8,4))
np.save("/tmp/cat_single.npy", np.zeros(3))
np.savez("/tmp/cat_int.npz", q=np.ones((8,4),int), k=np.ones((8,4),int), v=np.ones((8,4),int))
P
echo "not an npz" > /tmp/cat_text.npz
for args in "run --n 0" "run --n -5" "run --n abc" "run --d 0" "run --seed -1" "run --block 0" "run --samples 0" "run --bits 31" "run --bits 40" \
  "run --estimator foo" "run --engine cuda" "run --repeats 0" "run --input /nonexistent.npz" "run --input /tmp/cat_text.npz" \
  "run --input /tmp/cat_missing.npz" "run --input /tmp/cat_single.npy" "run --input /tmp/cat_nan.npz" "run --input /tmp/cat_int.npz" \
  "run --input /tmp/cat_ok.npz --json --repeats 1" "run --n 1 --d 1 --json --repeats 1 --no-theory" "run --n 16 --d 2 --min-seq-len 4 --block 4 --samples 4 --json --repeats 1" \
  "run --mode direct" "lm --n 0" "lm --n 7" "lm --n 99999" "lm --layers bogus" "lm --exact-set 'foo(3)'" "lm --samples -1" "lm --query-block 0" "lm --seed -1" "lm --text /nonexistent.txt" "lm --device tpu" "bogus" ""; do
  echo "=== hyperref $args"; eval timeout 60 nice $H $args > /tmp/cat_out.txt 2>&1; echo "rc=$?"; tail -c 400 /tmp/cat_out.txt | tail -4
done
