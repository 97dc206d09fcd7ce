"""The ``--workers`` option and the counters of a worker pool: parsing ``ray``, ``ray:auto`` or ``ray:HOST:PORT``
(:func:`parse_workers`), refusing an address nothing answers at (:func:`check_reachable`) and a missing Ray
(:func:`require_ray`) in one line each, and the per-worker and per-round statistics
:class:`~shapprune.game.distributed.RayBackend` keeps.
:mod:`shapprune.game.distributed` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shapprune.errors import UserError

INSTALL_HINT = "pip install -e '.[ray]'"


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class WorkersOption:
    """A parsed ``--workers`` value: ``ray`` (a local cluster), ``ray:auto`` or ``ray:HOST:PORT`` (join one)."""

    kind: str = "ray"
    address: str | None = None

    def __str__(self) -> str:
        return self.kind if self.address is None else f"{self.kind}:{self.address}"


def parse_workers(text: str | None) -> WorkersOption | None:
    """``None`` for none; else a :class:`WorkersOption`; one-line :class:`UserError` on anything else."""
    if text is None:
        return None
    text = str(text).strip()
    kind, _, address = text.partition(":")
    if kind != "ray":
        raise UserError(f"--workers {text!r}: expected ray, ray:auto or ray:HOST:PORT")
    if not address:
        return WorkersOption("ray", None)
    if address != "auto":
        if address.startswith("ray://"):
            host, port = address[len("ray://"):].rpartition(":")[::2]
        else:
            host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--workers {text!r}: the address must be auto or HOST:PORT, e.g. ray:10.0.0.1:6379")
    return WorkersOption("ray", address)


#: seconds to wait for a TCP connection to a Ray cluster's address before refusing it (Ray itself retries forever)
CONNECT_TIMEOUT = 5.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A TCP connection to ``HOST:PORT`` (or ``ray://HOST:PORT``) within ``timeout`` seconds, else a one-line
    :class:`UserError`: Ray's own client prints "Failed to connect to GCS" every few seconds without end."""
    import socket

    addr = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = addr.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or str(exc)
                                                                  or type(exc).__name__)
        raise UserError(f"no Ray cluster answers at {address} ({why}, waited up to {timeout:g} s); start one there "
                        f"with `ray start --head --port {port}`, or give --workers ray for a local cluster") from None


def require_ray():
    """Import Ray, or a one-line :class:`UserError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--workers ray needs Ray, which is not installed: run `{INSTALL_HINT}`") from None
    return ray


# ----------------------------------------------------------------------------------------------- statistics
@dataclass
class WorkerStats:
    masks: int = 0
    seconds: float = 0.0  # computing, as the worker measures it
    chunks: int = 0
    failures: int = 0


@dataclass
class RoundStats:
    masks: int = 0
    wall: float = 0.0  # driver wall time inside evaluate()
    compute: float = 0.0  # sum of workers' compute time
    per_worker: dict[int, WorkerStats] = field(default_factory=dict)
