"""One rank of the FSDP checkpoint test: ``python fsdp_worker.py RANK WORLD STORE OUT CONFIG BACKBONE_JSON``.

Wraps a tiny Swin with the policies of ``configs/trainer/fsdp.yaml`` as Lightning's FSDPStrategy does (activation
checkpointing, then FullyShardedDataParallel), runs a training step, and takes the full state dict the way the
strategy saves checkpoints; rank 0 writes it, with the weights before wrapping, to OUT.
"""

import json
import sys

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

from swin.data.shapes import SHAPE_CLASSES
from swin.models import build_swin


def fsdp_strategy(config: str) -> FSDPStrategy:
    """The FSDPStrategy a trainer config builds, its classes resolved as LightningCLI resolves them."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = yaml.safe_load(open(config))["trainer"]["strategy"]
    return parser.instantiate(parser.parse_object({"strategy": strategy})).strategy


def main(rank: int, world: int, store: str, out: str, config: str, backbone: dict) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_swin("custom", **backbone, num_classes=len(SHAPE_CLASSES))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = fsdp_strategy(config)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _setup_activation_checkpointing(model, strategy._activation_checkpointing_kwargs)
        wrapped = FullyShardedDataParallel(
            model, sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"), **strategy.kwargs
        )
        wrapped(torch.randn(2, 3, 32, 32)).sum().backward()
        full = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, full):
            state = wrapped.state_dict()
        if rank == 0:  # Lightning saves from rank 0, under the LightningModule's attribute names
            units = sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())
            checkpointed = sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules())
            checkpoint = {"state_dict": {f"backbone.{k}": v for k, v in state.items()}, "global_step": 1}
            saved = {"checkpoint": checkpoint, "reference": reference, "units": units, "checkpointed": checkpointed}
            torch.save(saved, out)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], json.loads(sys.argv[6]))
