#!/usr/bin/env bash
# The CUDA checks of `cargo xtask gpu-check`, run on a GPU machine that has no cargo, from the folder the
# xtask filled (target/gpu-check): bin/dino.xz and bin/device.xz (the CUDA builds, unpacked here on first use),
# dino_step.py (the PyTorch step).
#
#   bash target/gpu-check/run.sh [PARTS...]      PARTS: tests train bench (default: all three)
#
# - tests: the golden and gradient-presence checks (`portable::` tests of the device binary) on GPU 0;
# - train: 50 iterations of the no-argument (default preset) run on the CPU and on CUDA, losses compared;
# - bench: the step benchmark's four configs on CUDA, dino-rs f32 and bf16 beside PyTorch eager fp32 and bf16
#   autocast on the same card (python3 with torch); ROUNDS=N interleaved rounds (default 1).
# Results go to $OUT (or target/gpu-check/out): test log, train logs, bench JSON lines and summary.txt.
# The golden files are read where the test binary was built to find them (<repo>/../shared); set
# DINO_SHARED to a copy elsewhere. CUDA libraries (libcublas, libcublasLt, libcurand, libnvrtc) are
# searched for under python3's site-packages (the nvidia-* wheels that torch brings) unless
# LD_LIBRARY_PATH already holds them.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$HERE/out}"
mkdir -p "$OUT"
PARTS="${*:-tests train bench}"
SUMMARY="$OUT/summary.txt"
for b in dino device; do
    if [ ! -x "$HERE/bin/$b" ] || [ "$HERE/bin/$b.xz" -nt "$HERE/bin/$b" ]; then
        if command -v xz >/dev/null; then xz -dc "$HERE/bin/$b.xz" >"$HERE/bin/$b"
        else python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$HERE/bin/$b.xz" >"$HERE/bin/$b"; fi
        chmod +x "$HERE/bin/$b"
    fi
done
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

libs="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for so in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
say "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"

# The test binary reads the golden files at <build checkout>/../shared (a path fixed at build time).
if [ -n "${DINO_SHARED:-}" ]; then
    built_root="$(cat "$HERE/build-root.txt")"
    mkdir -p "$built_root/crates/dino-core" "$built_root/crates/dino-models" "$built_root/crates/dino-train"
    target="$(dirname "$built_root")/shared"
    if [ ! -e "$target" ]; then ln -s "$DINO_SHARED" "$target"; fi
fi

status=0
for part in $PARTS; do
case "$part" in
tests)
    start=$(date +%s)
    # resnet_golden needs golden-aug's 45 MB ResNet-18 weights: DINO_GPU_SKIP='resnet_golden' leaves it out.
    skip=()
    for s in ${DINO_GPU_SKIP:-}; do skip+=(--skip "$s"); done
    DINO_TEST_DEVICE=cuda "$HERE/bin/device" portable:: "${skip[@]}" --test-threads=1 2>&1 | tee "$OUT/tests.log" | tail -40
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || status=1
    say "tests: $(grep -E '^test result' "$OUT/tests.log" | tail -1) ($(( $(date +%s) - start )) s, exit $rc)"
    grep -E '^test .* FAILED|panicked' "$OUT/tests.log" | head -20 | tee -a "$SUMMARY"
    ;;
train)
    for dev in cpu cuda; do
        start=$(date +%s)
        rm -rf "$OUT/run-$dev"
        "$HERE/bin/dino" train --device "$dev" --output-dir "$OUT/run-$dev" --stop-after 50 --no-tensorboard \
            >"$OUT/train-$dev.log" 2>&1
        rc=$?
        [ "$rc" -eq 0 ] || status=1
        say "train --device $dev: exit $rc, $(( $(date +%s) - start )) s; $(tail -1 "$OUT/train-$dev.log")"
    done
    python3 - "$OUT/run-cpu/log.jsonl" "$OUT/run-cuda/log.jsonl" <<'PY' | tee -a "$SUMMARY"
import json, sys
def steps(p):
    out = {}
    for line in open(p):
        r = json.loads(line)
        if r.get("kind") == "step":
            out[r["global_iteration"]] = r["loss"]
    return out
a, b = steps(sys.argv[1]), steps(sys.argv[2])
common = sorted(set(a) & set(b))
worst = max((abs(a[g] - b[g]) / abs(a[g]), g) for g in common)
print("train: losses at iterations", common)
print("  cpu :", " ".join(f"{a[g]:.6f}" for g in common))
print("  cuda:", " ".join(f"{b[g]:.6f}" for g in common))
print(f"  largest relative difference {worst[0]:.2e} (iteration {worst[1]}); tolerance 1e-3:",
      "PASS" if worst[0] <= 1e-3 else "FAIL")
sys.exit(0 if worst[0] <= 1e-3 else 1)
PY
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    ;;
bench)
    : >"$OUT/bench.jsonl"
    for round in $(seq "${ROUNDS:-1}"); do
    for case in imagenet/65536 imagenet/4096 cifar/65536 cifar/4096; do
        for p in highest bf16; do
            DINO_BENCH_CASE="step/$case" DINO_BENCH_PRECISION=$p DINO_TEST_DEVICE=cuda \
                "$HERE/bin/device" bench_step_on_test_device --ignored --exact --nocapture --test-threads=1 \
                2>>"$OUT/bench.err" | grep -o '{.*}' >>"$OUT/bench.jsonl"
        done
        for p in "" --bf16; do
            python3 "$HERE/dino_step.py" --case "$case" --device cuda --steps 20 --warmup 3 $p \
                2>>"$OUT/bench.err" >>"$OUT/bench.jsonl"
        done
    done
    done
    python3 - "$OUT/bench.jsonl" <<'PY' | tee -a "$SUMMARY"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def ips(impl, prec, case):
    v = [r["images_per_s"] for r in rows if r.get("impl") == impl and r.get("precision") == prec
         and r["case"] == "step/" + case]
    return statistics.median(v) if v else float("nan")
print("bench (images/s on the GPU; per case the median over rounds of each run's median step of 20):")
print(f"{'case':16} {'dino-rs f32':>12} {'dino-rs bf16':>13} {'torch fp32':>11} {'torch bf16':>11}")
for case in ["imagenet/65536", "imagenet/4096", "cifar/65536", "cifar/4096"]:
    print(f"{case:16} {ips('dino-rs','highest',case):12.1f} {ips('dino-rs','bf16',case):13.1f} "
          f"{ips('pytorch','fp32',case):11.1f} {ips('pytorch','bf16',case):11.1f}")
PY
    ;;
*) echo "unknown part $part (tests, train, bench)"; status=2 ;;
esac
done
say "exit $status"
exit $status
