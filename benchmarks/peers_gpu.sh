#!/usr/bin/env bash
# The peers table on the GPU machine: installs the peers carried in .whl/ (made by
# benchmarks/peers_wheels.sh), builds the authors' kernels from their source, DeepSpeed's
# FusedAdam and our kernels (the three builds at once), then runs benchmarks/peers.py.
# Usage (repository root): OUT=dir bash benchmarks/peers_gpu.sh [peers.py arguments]
# Writes under $OUT: build_authors.log, build_deepspeed.log, build_ours.log, peers.json,
# peers.png, peers.log.
set -o pipefail
OUT=${OUT:-/tmp/peers}; mkdir -p "$OUT"
# DeepSpeed's builder reads plain major.minor entries (the image's list says 9.0a).
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext}
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
AUTHORS=/tmp/ista_cuda
export PYTHONPATH=/tmp/site:$AUTHORS:$PWD
mkdir -p "$AUTHORS" && tar xzf .whl/ista_daslab_optimizers_cuda-*.tar.gz -C /tmp || exit 1
# Their setup.py builds five extensions one after another (about a minute each); built here as
# five just-in-time loads at once, each .so then copied into $AUTHORS as a top-level module.
python3 - /tmp/ista_daslab_optimizers_cuda-*/ "$AUTHORS" > "$OUT/build_authors.log" 2>&1 <<'EOF' &
import concurrent.futures, glob, multiprocessing, os, runpy, shutil, sys
import setuptools

src, dest = sys.argv[1], sys.argv[2]
exts = []
setuptools.setup = lambda **kw: exts.extend(kw["ext_modules"])
os.chdir(src)
runpy.run_path("setup.py")


def build(ext):
    from torch.utils.cpp_extension import load
    where = os.path.join(dest, "build", ext.name)
    os.makedirs(where, exist_ok=True)
    load(ext.name, [os.path.join(src, s) for s in ext.sources], extra_cflags=["-O3"], build_directory=where)
    for so in glob.glob(os.path.join(where, "*.so")):
        shutil.copy(so, dest)
    return ext.name


os.environ["MAX_JOBS"] = "4"
with concurrent.futures.ProcessPoolExecutor(len(exts), mp_context=multiprocessing.get_context("fork")) as pool:
    for name in pool.map(build, exts):
        print("built", name, flush=True)
EOF
python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
  > "$OUT/build_deepspeed.log" 2>&1 &
python3 -m microadam_dist.env > "$OUT/build_ours.log" 2>&1
wait
echo "builds: $(( $(date +%s) - start )) s"
tail -n 2 "$OUT"/build_*.log
python3 benchmarks/peers.py --out "$OUT/peers.json" "$@" 2>&1 | tee "$OUT/peers.log"
echo "total: $(( $(date +%s) - start )) s"
