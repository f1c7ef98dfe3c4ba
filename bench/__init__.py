"""Benchmarks for eplb_pynccl: ``python -m bench.run --help``.

Modules:
    run      the CLI (argument parsing, orchestration, output files)
    harness  process spawning, the per-rank :class:`~bench.harness.BenchContext`, timing/statistics
    micro    the NCCL micro-benchmarks (sendrecv, alltoall, overhead)
    report   row schema, text/Markdown tables, JSON, plots, and a CPU self-check
"""
