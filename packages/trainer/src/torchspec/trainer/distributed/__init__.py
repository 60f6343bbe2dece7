"""Processes and placement: the process group and device mesh, FSDP2 and activation checkpointing
applied from outside the models, and the host allocator of CPU runs."""

from torchspec.trainer.deprecated_paths import forwarding_getattr

# torchspec.trainer.distributed was a module before 0.7.0; its names now live in distributed.process_group.
__getattr__ = forwarding_getattr(__name__, "process_group")
