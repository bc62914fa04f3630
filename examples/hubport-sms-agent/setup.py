"""Legacy shim: lets pip install the package offline without the wheel package."""

from setuptools import setup

setup()
