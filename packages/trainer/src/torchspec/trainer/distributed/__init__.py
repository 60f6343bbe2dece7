"""Processes and placement: the process group and device mesh, FSDP2 and activation checkpointing
applied from outside the models, and the host allocator of CPU runs."""


def __getattr__(name: str):
    # torchspec.trainer.distributed was a module before 0.7.0; its names now live in distributed.process_group.
    import importlib
    import warnings

    module = importlib.import_module(f"{__name__}.process_group")
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} moved to {module.__name__}.{name} in torchspec-trainer 0.7.0",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)
