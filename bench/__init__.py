"""Benchmarks: run as modules from the repository root, e.g. ``python -m bench.attention --quick``.

A package (rather than loose scripts) so that every measurement can run in a fresh child process
(``python -m bench._worker``) that imports the same code as the parent.
"""
