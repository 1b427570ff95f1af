"""Building blocks of benchmarks/bench_sp.py: ulysses_sp vs DeepSpeed ALST under one launch.

comm.py      exposed communication time from a torch.profiler trace of one step
levers.py    opt-in levers (SDPA backend priority, selective checkpointing, tiled MLP, checkpoint offload)
workload.py  what both sides share: model build, batch, DeepSpeed config
ours.py      the ulysses_sp side
alst.py      the DeepSpeed ALST side, used the way ArcticTraining uses it
runner.py    one measured configuration, OOM-safe across ranks; max-length search
report.py    environment/versions, the rank-0 table, the JSON file
The MFU formula is the package's (ulysses_sp/train/flops.py, also used by the trainer's summary); the
JSON repeats it.
"""
