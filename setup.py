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
    entry_points={"console_scripts": [
        "longmem-eval-lm = longmem.commands.eval_lm:main",
        "longmem-eval-icl = longmem.commands.eval_icl:main",
        "longmem-ablate-memory = longmem.commands.ablate_memory:main",
        "longmem-diagnose-memory = longmem.commands.diagnose_memory:main",
        "longmem-prepare-pile = longmem.commands.prepare_pile:main",
        "longmem-build-broad-corpus = longmem.commands.build_broad_corpus:main",
        "longmem-make-longrange = longmem.commands.make_longrange:main",
        "longmem-build-shakespeare = longmem.commands.build_shakespeare_corpus:main",
        "longmem-spm-bpe = longmem.commands.spm_bpe:main",
        "longmem-hf-tokens = longmem.commands.hf_tokens:main",
        "longmem-generate = longmem.commands.generate:main",
        "longmem-generation-recall = longmem.commands.generation_recall:main",
        "longmem-demo = longmem.demo:main",
        "longmem-recipe = longmem.recipes:main",
        "longmem-launch = longmem.launch:main",
    ]},
    extras_require={
        "cpu": ["faiss-cpu==1.15.1"],
        "gpu": ["faiss-gpu==1.15.1"],
        # a Hugging Face backbone (longmem/models/hf_causal_lm.py), loaded from local files only
        "hf": ["transformers==5.24.0", "gguf==0.19.0", "accelerate==1.15.0"],
    },
)
