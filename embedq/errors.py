"""Every error embedq raises on purpose. Callers see these same classes on ``.get()``.

Each takes one message string, so Celery can rebuild it on the caller's side from the
JSON-safe form it sends (type name, module, message).
"""

from __future__ import annotations


class EmbedqError(Exception):
    """Base class of all embedq errors."""


class InvalidInputError(EmbedqError, ValueError):
    """The request itself is malformed: wrong types, bad encoding, inconsistent lengths."""


class TooManyTextsError(InvalidInputError):
    """More texts in one call than ``EMBEDQ_MAX_TEXTS_PER_TASK`` allows."""


class InvalidFilterError(InvalidInputError):
    """A metadata filter (``where``) that is malformed or over its limits: unknown operator,
    wrong operand, too many conditions, too deep, a NUL, a number no store compares."""


class UnknownModelError(EmbedqError, LookupError):
    """The request names a model this worker does not serve."""


class CollectionModelError(EmbedqError, ValueError):
    """Vectors of one model sent to a collection bound to another (the model that first
    filled it): refused, since vectors of two models cannot be searched together."""


class ModelLoadError(EmbedqError):
    """The model could not be loaded from the local files."""


class EncoderError(EmbedqError):
    """Encoding failed for a reason other than the input (even after splitting the batch)."""


class DeviceFailedError(EncoderError):
    """The device itself failed (CUDA illegal memory access, device-side assert, any other
    "CUDA error"): its context is unusable, so the worker stops to be restarted and the
    tasks in flight are retried elsewhere."""


class NonFiniteVectorError(EncoderError):
    """The model returned NaN or infinite values for a text, in its dtype and again in
    fp32: the vector is refused (never cached or stored)."""


class StoreError(EmbedqError):
    """The durable store refused a write or a read."""


class NoWorkerError(EmbedqError):
    """A task names a queue (and model) that no live worker serves while other workers are
    alive: refused when sent (HTTP 503), so it never waits in a queue nobody reads."""


class UnavailableError(EmbedqError):
    """A server embedq needs (Redis, the store) does not answer: down, unreachable, or
    blackholing. The message names it, its URL (password hidden), the cause and the cure."""


class BrokerUnavailableError(UnavailableError):
    """The broker's Redis does not answer (never reached by this process within
    ``EMBEDQ_PROBE_TIMEOUT_S``, or lost past the publish retries), or no embedded one could
    be started."""


class StoreUnavailableError(UnavailableError, StoreError):
    """The store's database does not answer (a :class:`StoreError`, so tasks retry it)."""


class ConfigurationError(EmbedqError):
    """A setting has a value embedq cannot work with."""


class PortInUseError(EmbedqError):
    """A port a server should listen on is taken (or not allowed) on this host."""


class IndexQualityError(EmbedqError):
    """A freshly built index missed the recall target; the previous index stays in use."""


class IndexBuildBusyError(EmbedqError):
    """Another build of the same collection holds its lock (on this host or another)."""


class StaleVersionError(EmbedqError):
    """A blob built from an older snapshot than the published one: never published."""


class IndexIntegrityError(EmbedqError):
    """A published index whose bytes do not match its sha256 or its layout: not loaded."""


class DeadlineExceededError(EmbedqError):
    """The caller's deadline passed before the work was done (its task was waiting for a
    worker, or its texts for the encoder): dropped unencoded, since nobody waits for it."""


class PoisonTaskError(EmbedqError):
    """A task whose workers died running it ``EMBEDQ_TASK_MAX_DELIVERIES`` times: not retried."""


#: Errors that are the caller's: reported, never retried, not counted against the error SLO.
INPUT_ERRORS: tuple[type[EmbedqError], ...] = (
    InvalidInputError,
    UnknownModelError,
    CollectionModelError,
)
