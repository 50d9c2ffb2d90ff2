"""celljepa-dist: distributed pre-training of Cell-JEPA single-cell foundation models.

torch is pinned loosely on purpose: `make` installs the local CPU wheel (torch==2.13.0) first so
that nothing here ever pulls a CUDA build; on GPU machines users bring their own CUDA torch.
deepspeed ships as an sdist whose build imports torch, hence `pip install --no-build-isolation`.
"""
from setuptools import find_packages, setup

setup(
    name="celljepa-dist",
    version="0.1.0",
    description="Distributed pre-training of Cell-JEPA single-cell foundation models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["celljepa_dist", "celljepa_dist.*"]),
    install_requires=[
        "torch>=2.5",  # FlexAttention; `make` installs the local CPU wheel 2.13.0 first
        "numpy>=1.24",
        "numba>=0.60",  # compiled per-cell kernels of the shard builder (data/kernels.py)
        "scipy>=1.10",
        "pandas>=2.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tiledbsoma>=1.15",
        "cellxgene-census>=1.15",
        "anndata>=0.10",
        "h5py>=3.8",
        "webdataset>=0.2.100",
        "deepspeed>=0.15",
        # The full package: `mlflow ui` / `launch/mlflow_ui.py` need its tracking server (Flask);
        # mlflow-skinny has no UI.
        "mlflow>=3.0",
        "sqlalchemy>=2.0",  # MLflow's local sqlite store (the file store is deprecated)
        "alembic>=1.12",
        "safetensors>=0.4",
        # Evaluation (AvgBIO as scib 1.1.5 defines it): scanpy's kNN graph + Louvain, sklearn scores.
        "scanpy>=1.10",
        "scikit-learn>=1.3",
        "umap-learn>=0.5",
        "louvain>=0.8",
        # louvain imports pkg_resources, which setuptools 81 removed; torch 2.13 needs >= 77.
        "setuptools>=77,<81",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "tiledbsoma-ml>=0.1", "ruff>=0.6"],  # tiledbsoma-ml: loader bench baseline
        # Never installed in CI: flash-attn needs CUDA and a compiler toolchain.
        "gpu": ["flash-attn>=2.6"],
    },
)
