from setuptools import find_packages, setup

setup(
    name="megatron_papo",
    version="0.1.0",
    description="PAPO (perception-aware policy optimization) for vision-language models on megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_papo", "megatron_papo.*"]),
    install_requires=[
        # An existing torch (NGC container, CPU build installed first by the Makefile) satisfies this.
        "torch>=2.6",
        # Pinned: megatron_papo/platform/cpu_compat.py was verified against exactly this version.
        "megatron-core==0.16.1",
        "webdataset>=0.2.100",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "psutil",  # megatron dist checkpointing needs it
        "pillow>=10",
        "numpy",
        "pyyaml",
        "safetensors>=0.4",
        "tqdm",
        # tools/make_shards.py reads parquet data sets (ViRL39K ships as parquet)
        "pyarrow>=14",
        # The grader of the published PAPO results; it imports pylatexenc and sympy without declaring them.
        "mathruler==0.1.0",
        "pylatexenc>=2.10",
        "sympy>=1.12",
    ],
    extras_require={
        # Present in NGC PyTorch containers; used when importable (FP8, fused kernels).
        "gpu": ["transformer-engine[pytorch]", "apex"],
        # transformers is the independent reference of the model and the HF checkpoint format.
        "hf": ["transformers>=5.0,<6"],
        # the chart of `megatron-papo compare --plot`
        "plot": ["matplotlib"],
        "test": ["pytest>=8", "pytest-timeout", "transformers>=5.0,<6", "matplotlib"],
    },
    entry_points={"console_scripts": ["megatron-papo=megatron_papo.cli:main"]},
)
