"""vitkern's benchmarks. The attention harness: ``python benchmarks/bench_attn.py --help`` (or
``python -m benchmarks.bench_attn``), built from:

workloads.py  the attention problems, named after the systems they stand for, sized per device
peers.py      every implementation timed side by side (naive, torch SDPA and its backends, FlexAttention,
              nested jagged, flash-attn, xformers, and each vitkern backend)
measure.py    timing, peak memory, memory budget
report.py     JSON, markdown and PNG output
"""
