"""The trainer's view of the distributed engine: Horovod when importable, one process otherwise.

Only gan.train uses this; it keeps the ``import horovod`` optional so the trainer runs on a machine
without Horovod (one process) and the same code runs under ``horovodrun``/``mpirun``.
"""
from __future__ import annotations

import os


class Single:
    """One process, no communication."""

    name = "none"
    version = None
    rank = local_rank = 0
    size = local_size = 1

    def tape(self, tape):
        return tape

    def broadcast_variables(self, variables):
        pass

    def average_variables(self, variables):
        pass

    def allgather_object(self, obj):
        return [obj]


class Horovod:
    """horovod.tensorflow: DistributedGradientTape, broadcast from rank 0, allreduce, allgather."""

    name = "horovod"

    def __init__(self, hvd):
        import horovod

        hvd.init()
        self.hvd = hvd
        self.version = horovod.__version__
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()

    def tape(self, tape):
        return self.hvd.DistributedGradientTape(tape)

    def broadcast_variables(self, variables):
        if self.size > 1:
            self.hvd.broadcast_variables(variables, root_rank=0)

    def average_variables(self, variables):
        """Replace each variable by its mean over ranks (used for BN moving statistics)."""
        if self.size > 1:
            for v in variables:
                v.assign(self.hvd.allreduce(v, op=self.hvd.Average, name=f"avg_{v.name}".replace(":", "_")))

    def allgather_object(self, obj):
        return self.hvd.allgather_object(obj) if self.size > 1 else [obj]


def launched_ranks() -> int:
    """How many ranks the launcher started (horovodrun/Gloo or mpirun/MPI), 1 when run directly."""
    for var in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def local_position():
    """(local_rank, local_size) from the launcher's environment, before Horovod is initialised."""
    for r, s in (("HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
                 ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")):
        if os.environ.get(r) and os.environ.get(s):
            return int(os.environ[r]), int(os.environ[s])
    return 0, 1


def init(use_horovod=True):
    """Start the engine. Raises when launched with several ranks but Horovod is not importable."""
    if use_horovod:
        try:
            import horovod.tensorflow as hvd
        except ImportError as e:
            if launched_ranks() > 1:
                raise RuntimeError(f"launched with {launched_ranks()} ranks but horovod.tensorflow does not "
                                   f"import ({e}); run harness/setup.sh to build Horovod") from e
            return Single()
        return Horovod(hvd)
    if launched_ranks() > 1:
        raise RuntimeError("--no-horovod given but the launcher started several ranks")
    return Single()
