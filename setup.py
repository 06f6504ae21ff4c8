"""megatron_emu: pretraining Emu2-class multimodal models on megatron-core.

The C++/CUDA extension of csrc/ is built here (CPU always, CUDA when torch has CUDA or
MEGATRON_EMU_BUILD_CUDA=1; MEGATRON_EMU_BUILD_CUDA=0 skips it). A missing extension falls back
to a pure-torch path at run time.
"""

from setuptools import find_packages, setup

SAMPLES = ["scikit-image", "scikit-learn", "matplotlib"]

setup(
    name="megatron_emu",
    version="0.1.0",
    description="3D-parallel pretraining of Emu2-class generative multimodal models on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_emu", "megatron_emu.*", "data_tools", "data_tools.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the last release installable on Python 3.11 (CI); newer releases need 3.12.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1; python_version >= '3.12'",
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
                 *SAMPLES],
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "nvidia-dali-cuda130"],
    },
    entry_points={
        "console_scripts": [
            "megatron-emu-train=megatron_emu.cli.train:main",
            "megatron-emu-data=data_tools.cli:main",
            "megatron-emu-convert=megatron_emu.cli.convert:main",
            "megatron-emu-generate=megatron_emu.cli.generate:main",
        ]
    },
)
