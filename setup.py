"""Build hook: compiles the native KVM runtime (native/*.c) into `native._vmm` through cffi."""

from setuptools import setup

setup(cffi_modules=["native/_build.py:ffibuilder"])
