"""megatron_emu: pretraining Emu2-class multimodal models on megatron-core.

The C++/CUDA extension of csrc/ is built here (CPU always, CUDA when torch has CUDA or
MEGATRON_EMU_BUILD_CUDA=1; MEGATRON_EMU_BUILD_CUDA=0 skips it). A missing extension falls back
to a pure-torch path at run time.
"""

import os
import sys

from setuptools import find_packages, setup

SAMPLES = ["scikit-image", "scikit-learn", "matplotlib"]



def extensions():
    """The CPU extension always (when torch is importable), the CUDA one when torch has CUDA
    and a toolkit is found; MEGATRON_EMU_BUILD_CUDA=0/1 overrides. Without torch in the build
    environment (an isolated build: use --no-build-isolation) nothing is compiled and the
    pure-torch kernels are used at run time."""
    try:
        import torch
        from torch.utils import cpp_extension as cpp
    except ImportError:
        print("megatron_emu: torch is not importable at build time; skipping the C++ extension "
              "(pip install --no-build-isolation -e . builds it)", file=sys.stderr)
        return [], {}
    flags = ["-O3", "-fopenmp"]
    exts = [cpp.CppExtension("megatron_emu._C", ["csrc/fused_l2/l2_loss_cpu.cpp"],
                             extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"])]
    env = os.environ.get("MEGATRON_EMU_BUILD_CUDA")
    has_cuda = torch.version.cuda is not None and cpp.CUDA_HOME is not None
    if env == "1" and not has_cuda:
        sys.exit(f"MEGATRON_EMU_BUILD_CUDA=1 but torch {torch.__version__} has no CUDA "
                 f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp.CUDA_HOME})")
    if env != "0" and has_cuda:
        exts.append(cpp.CUDAExtension(
            "megatron_emu._C_cuda", ["csrc/fused_l2/l2_loss_cuda.cu", "csrc/fused_l2/cuda_module.cpp"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}))
    return exts, {"build_ext": cpp.BuildExtension.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = extensions()

setup(
    name="megatron_emu",
    version="0.1.0",
    description="3D-parallel pretraining of Emu2-class generative multimodal models on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_emu", "megatron_emu.*", "data_tools", "data_tools.*"]),
    include_package_data=True,
    # The transformers model code mcore-to-hf copies into every Emu2 directory it writes.
    package_data={"megatron_emu.checkpoint": ["hf_model/*.py"]},
    install_requires=[
        "torch>=2.6",
        "av",  # PyAV: video decoding at preprocessing and generation (bundles FFmpeg; no system ffmpeg)
        # The versions tested on each Python (megatron_emu/compat/version.py checks the range at
        # start-up): 0.16.1 is the last release installable on Python 3.11 (CI); 0.19.2 on 3.12.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core==0.19.2; python_version >= '3.12'",
        "isal",  # ISA-L's CRC-32 for checkpoint checksums (zlib's checksum, ~6x faster)
        "numpy<2.5",
        "packaging",
        "pillow",
        "protobuf",  # sentencepiece model editing (tiny tokenizers)
        "psutil",  # used by megatron-core's checkpoint writer, not declared by it
        "pyarrow",  # OBELICS / LAION parquet inputs
        "pyyaml",
        "safetensors",
        "sentencepiece",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        # Real photos shipped in these wheels: the quickstart's and the tests' sample data.
        "samples": SAMPLES,
        # DALI's CPU decoder runs everywhere; its nvJPEG path needs a GPU.
        "dali": ["nvidia-dali-cuda130"],
        "test": ["pytest>=8", "pytest-timeout", "transformers", "webdataset", "nvidia-dali-cuda130",
                 "wandb", *SAMPLES],
        # Optional experiment tracking (run.wandb).
        "wandb": ["wandb"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "nvidia-dali-cuda130"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": [
            "megatron-emu-train=megatron_emu.cli.train:main",
            "megatron-emu-launch=megatron_emu.cli.launch:main",
            "megatron-emu-data=data_tools.cli:main",
            "megatron-emu-convert=megatron_emu.cli.convert:main",
            "megatron-emu-generate=megatron_emu.cli.generate:main",
        ]
    },
)
