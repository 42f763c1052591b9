"""Everything is declared in pyproject.toml; this file only lets tools that still call `setup.py` build it."""

from setuptools import setup

setup()
