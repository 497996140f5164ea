# Source this: the CUDA 13.0 build toolchain of the `cuda` feature, from PyPI wheels (no driver, no GPU needed),
# shared by .ci/run and `cargo xtask gpu-check`. It installs once into $DINO_CUDA_VENV (default
# /opt/dino-cuda-venv) and exports PATH (nvcc), CUDA_ROOT / CUDA_PATH (headers for candle-kernels and cudarc)
# CUDA_COMPUTE_CAP (default 90: H100/H200; set it before sourcing for another GPU) and LIBRARY_PATH (below).
#
# Why 13.0: the GPU machines here run driver 580 (CUDA 13.0); candle compiles its kernels to PTX, and a driver
# refuses PTX from a newer toolkit (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). cudarc 0.19.10 accepts CUDA up to 13.4.
# `nvidia-cuda-nvcc` ships nvcc, `-crt` and `-nvvm` its front end pieces, `-cccl` the <nv/target> headers that
# cuda_fp16.h includes, `-runtime` cuda_runtime.h. Nothing is linked: candle-core is built with cudarc's
# `dynamic-loading`, so libcuda/libcublas/libcurand/libnvrtc are opened at run time (see docs/CUDA.md).
DINO_CUDA_VENV="${DINO_CUDA_VENV:-/opt/dino-cuda-venv}"
_dino_cuda_pkgs="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85"
if [ ! -x "$DINO_CUDA_VENV/bin/python" ]; then
    python3 -m venv "$DINO_CUDA_VENV" || return 1 2>/dev/null || exit 1
fi
_dino_cuda_root="$("$DINO_CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)"
if [ -z "$_dino_cuda_root" ] || [ ! -x "$_dino_cuda_root/bin/nvcc" ] || [ ! -e "$_dino_cuda_root/include/nv/target" ]; then
    echo "== pip install $_dino_cuda_pkgs (into $DINO_CUDA_VENV)"
    # shellcheck disable=SC2086
    "$DINO_CUDA_VENV/bin/pip" install -q $_dino_cuda_pkgs || return 1 2>/dev/null || exit 1
    _dino_cuda_root="$("$DINO_CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
fi
# candle-kernels links its quantized-matmul library against `-lcudart` (dynamic). The wheel has no unversioned
# libcudart.so; a linker script of that name pulls in libcudart_static.a instead, so the binaries do not need
# libcudart.so.13 at run time (the static runtime opens the driver only when a CUDA device is used). LIBRARY_PATH
# is read by the `cc` link driver and is not part of cargo's fingerprints.
mkdir -p "$DINO_CUDA_VENV/dino-link"
echo "INPUT($_dino_cuda_root/lib/libcudart_static.a)" >"$DINO_CUDA_VENV/dino-link/libcudart.so"
export LIBRARY_PATH="$DINO_CUDA_VENV/dino-link${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_ROOT="$_dino_cuda_root" CUDA_PATH="$_dino_cuda_root"
export PATH="$_dino_cuda_root/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# candle-kernels' build script (cudaforge) runs nvcc on half the cores by default: one file at a time on 2 cores,
# 14 min for its 15 quantized-matmul files on an AVX2 EPYC. Every core it is.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
unset _dino_cuda_pkgs _dino_cuda_root
