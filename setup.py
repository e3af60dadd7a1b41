"""hvdclip: gradient clipping done right for Horovod data-parallel training.

TensorFlow and Horovod are deliberately not listed in install_requires: Horovod must be compiled
against the TensorFlow that is installed (and patched for TF >= 2.16), which pip cannot do from a
requirement line. `make install` (docker/install_python.sh) installs both, with the versions pinned
in versions.env.
"""
from setuptools import find_packages, setup

setup(
    name="hvdclip",
    version="0.1.0",
    description="Data-parallel TensorFlow/Keras 3 training with Horovod, clipping the globally reduced gradient.",
    python_requires=">=3.10",
    packages=find_packages(include=["hvdclip", "hvdclip.*"]),
    install_requires=["numpy"],
    entry_points={"console_scripts": ["hvdclip-run = hvdclip.launch.cli:main"]},
)
