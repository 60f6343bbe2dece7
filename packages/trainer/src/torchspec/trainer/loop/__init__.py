"""The online training loop: the trainer that composes the components, and the components of a run
(checkpoints and resume, states, data order, LR schedule, optimizer, metrics, run lock). It reads
the target only through ``targets.contract``."""
