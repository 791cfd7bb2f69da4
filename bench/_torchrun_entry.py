"""What ``torchrun --nproc_per_node=2`` launches in bench.train (b): the same training loop, cold.

    torchrun --nproc_per_node=2 bench/_torchrun_entry.py DATA_DIR CONFIG_JSON
"""

import json
import os
import sys

import torch.distributed as dist

from labkit.train import TrainConfig, run_loop


def main() -> None:
    data_dir, config_json = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    try:
        res = run_loop(TrainConfig(**json.loads(config_json)), data_dir, rank=rank, world_size=world, device="cpu")
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"first_step_time": res.first_step_time, "steps": res.steps}), flush=True)


if __name__ == "__main__":
    main()
