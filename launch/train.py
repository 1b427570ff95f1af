"""Train a causal LM with Ulysses sequence parallelism: ``python launch/train.py --help``.

    deepspeed --num_gpus 8 launch/train.py --sp-size 4 --deepspeed configs/deepspeed/zero3.json
    torchrun --nproc_per_node 4 launch/train.py --sp-size 2 --device cpu
    accelerate launch --config_file configs/accelerate/sp2.yaml launch/train.py

The flags are the fields of :class:`ulysses_sp.train.config.TrainConfig`; the run is
:func:`ulysses_sp.train.run.run` (docs/architecture.md).
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ulysses_sp.train.cli import main

if __name__ == "__main__":
    record(main)()  # under torchrun: the failing rank's traceback goes into the launcher's failure summary
