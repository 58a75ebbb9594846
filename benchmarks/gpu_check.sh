#!/usr/bin/env bash
# The GPU check, under 8 minutes on one H100: the throughput benchmark (bf16 autocast,
# channels_last, data on the device, then torch.compile) for the small-image family at
# 28x28x1 and ResNet-18 at 32x32x3, each with its bare-PyTorch baseline in the same
# process, the labeler's own cost per image (a linear model in place of the network),
# bf16 against fp32 (benchmarks/precision.py),
# then one short Fashion-MNIST loop (teacher + one student).
#
#   benchmarks/gpu_check.sh          # on a CUDA machine
#   benchmarks/gpu_check.sh --cpu    # the same steps, scaled down, on CPU
#
# PYTHON picks the interpreter (default: python3); the library is imported from src/.
# FASHION_DIR: where the Fashion-MNIST .gz files are (default: the Debian package's);
# FASHION_ARGS: more options for benchmarks/fashion_mnist.py (say --ablations hard).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
fashion_dir="${FASHION_DIR:-/usr/share/datasets/fashion-mnist}"

if [[ "${1:-}" == "--cpu" ]]; then
  device=cpu
  sizes=(--train-images 256 --pool-images 512 --repeats 3)
  labeler_pool=512
  precision_sizes=(--images 256 --repeats 1)
  loop=(--set teacher.epochs=2 --set train.epochs=1 --set pseudo_label.balance=100)
  flags=()
else
  device=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  sizes=(--train-images 8192 --pool-images 32768 --repeats 5)
  labeler_pool=131072
  precision_sizes=(--images 8192 --repeats 3)
  loop=(--set train.epochs=6)
  flags=(--data-on-device)
fi
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'

for model in "small_resnet --size 28 --channels 1" "resnet18 --size 32 --channels 3"; do
  # shellcheck disable=SC2086 # $model is several words on purpose
  "$py" benchmarks/throughput.py --device "$device" --arch $model "${sizes[@]}" "${flags[@]}"
  if [[ "$device" == cuda ]]; then
    # shellcheck disable=SC2086
    "$py" benchmarks/throughput.py --device cuda --arch $model "${sizes[@]}" "${flags[@]}" \
      --compile --skip augment || echo "torch.compile run failed; the eager figures stand"
  fi
done

"$py" benchmarks/throughput.py --device "$device" --skip train,augment --linear-labeler \
  --pool-images "$labeler_pool" "${flags[@]}"

"$py" benchmarks/precision.py --device "$device" "${precision_sizes[@]}"

time "$py" benchmarks/fashion_mnist.py --device "$device" --source-dir "$fashion_dir" \
  --data-root "$(mktemp -d)" --limit 1 "${loop[@]}" ${FASHION_ARGS:-}
