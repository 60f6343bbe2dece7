"""vLLM: the one way the project starts it (``launch``), the child process it runs in (``worker``)
and the host-side KV connector that hands hidden states over (``connector``)."""

from torchspec.trainer.deprecated_paths import forwarding_getattr

# torchspec.trainer.engine was a module before 0.7.0; its names now live in engine.launch.
__getattr__ = forwarding_getattr(__name__, "launch")
