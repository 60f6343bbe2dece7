"""vLLM: the one way the project starts it (``launch``), the child process it runs in (``worker``)
and the host-side KV connector that hands hidden states over (``connector``)."""


def __getattr__(name: str):
    # torchspec.trainer.engine was a module before 0.7.0; its names now live in engine.launch.
    import importlib
    import warnings

    module = importlib.import_module(f"{__name__}.launch")
    if name.startswith("__") or not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} moved to {module.__name__}.{name} in torchspec-trainer 0.7.0",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)
