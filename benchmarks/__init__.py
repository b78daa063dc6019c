"""Benchmarks for distcomp, each against peers run in the same invocation.

Run ``python -m benchmarks --help``; see ``benchmarks/README.md`` for what each
benchmark measures and how to read its ratios.
"""
