"""Install with `pip install -e .` (add `[test]` for the test tools)."""
import setuptools

setuptools.setup(
    name="memorizing",
    version="0.1.0",
    description="Memorizing Transformers (Wu et al., ICLR 2022) in JAX/Flax",
    # The gin configs (configs/ in the repository) install as memorizing/configs/,
    # found from any directory (memorizing/tools/gin_config.py).
    packages=setuptools.find_packages(include=["memorizing", "memorizing.*"]) + [
        "memorizing.configs"],
    package_dir={"memorizing.configs": "configs"},
    package_data={"memorizing.configs": ["*.gin", "*/*.gin", "*/*/*.gin", "*/*.yaml",
                                         "*/*/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # Ranges checked against jax 0.10 (CPU CI) and jax 0.11 (GPU host).
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "gin-config>=0.5",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        # Data: TFDS read as ArrayRecord through tfds.data_source; never needs
        # TensorFlow (scann 1.4.2 breaks next to most TensorFlow versions).
        "tensorflow-datasets>=4.9.4",
        "array-record>=0.5",
        "importlib_resources>=5",
        "etils[epath,epy]>=1.5",
    ],
    extras_require={
        "scann": ["scann==1.4.2"],
        "plots": ["matplotlib>=3.7"],
        # wheel: tests/test_packaging.py builds the wheel offline (--no-build-isolation).
        # pytest-xdist: the default run uses two workers (pytest.ini).
        "test": ["pytest>=7", "pytest-xdist>=3", "wheel"],
        # Preparing the official corpora (pg19, arxiv from GCS; C4 with Beam) only.
        "prepare": ["tensorflow==2.20.*", "apache-beam>=2.50"],
    },
    entry_points={
        "console_scripts": [
            "memorizing-train=memorizing.cli:train_main",
            "memorizing-eval=memorizing.cli:eval_main",
            "memorizing-sweep=memorizing.cli:sweep_main",
            "memorizing-table4=memorizing.cli:table4_main",
            "memorizing-prepare=memorizing.cli:prepare_main",
            "memorizing-tokenizer=memorizing.cli:tokenizer_main",
            "memorizing-plot=memorizing.cli:plot_main",
            "memorizing-generate=memorizing.cli:generate_main",
            "memorizing-inspect=memorizing.cli:inspect_main",
        ]
    },
)
