from setuptools import find_packages, setup

setup(
    name="longmem",
    version="0.1.0",
    description="LongMem (Wang et al., NeurIPS 2023) as a fairseq --user-dir plugin",
    packages=find_packages(include=["longmem", "longmem.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "fairseq-fixed==0.12.3.1",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "numpy",
        "tqdm",
        "sentencepiece",
        "regex",
        "zstandard",
        "matplotlib",
    ],
    extras_require={
        "cpu": ["faiss-cpu==1.15.1"],
        "gpu": ["faiss-gpu==1.15.1"],
    },
)
