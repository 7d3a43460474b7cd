"""Measuring tools: run the algorithms' own steps and report what they cost, outside the event loop.

Nothing in the event loop (engine, runner, algorithms) imports this package; it imports them.

- ``simulator.measure.memory``: client peak memory of one training step (FedAvg, FedLoRA,
  SplitFed, MU-SplitFed), accounted on ``meta`` and measured on a real step, and
  ``StorageTracker``, the live tensor storage counter behind both (``sflsim memory``,
  ``benchmarks/memory_table.py``, ``benchmarks/zo_memory.py``; docs/memory.md).
"""
