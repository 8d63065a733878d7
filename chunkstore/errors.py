"""Errors a user can act on. Each carries one line that says what went wrong."""


class ChunkstoreError(Exception):
    """Base of every error chunkstore reports to a user; str() is the one-line reason."""

    exit_code = 1


class InvalidInput(ChunkstoreError):
    """A malformed argument, path, ref or request."""

    exit_code = 2


class NotFound(ChunkstoreError):
    """A repo, tag, version, file, manifest or chunk that does not exist."""

    exit_code = 3


class StageClaimed(NotFound):
    """A stage that a claimant deleted here lately: only that claimant may put it back (see
    :meth:`~chunkstore.stores.base.MetaStore.restore_stage`)."""

    def __init__(self, stage_id: bytes):
        self.stage_id = stage_id
        super().__init__(
            f"stage {stage_id.hex()} was claimed (deleted) here by a commit, or deleted since: "
            "only the claimant that deleted it may put it back, and only within an hour of "
            "the delete, or of the stage's expiry if later"
        )


class TensorNotFound(NotFound, KeyError):
    """A tensor name a file's index lacks; a KeyError too, as a missing key of a mapping."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""


class AmbiguousRef(InvalidInput):
    """An id prefix that matches more than one version."""


class CorruptChunk(ChunkstoreError):
    """Stored bytes that do not hash to their chunk id, or cannot be decoded."""

    exit_code = 4

    def __init__(self, chunk_id: bytes, reason: str = "content does not match its id"):
        self.chunk_id = chunk_id
        super().__init__(f"chunk {chunk_id.hex()} is corrupt: {reason}")


class CorruptStore(ChunkstoreError):
    """A store whose own files are damaged: cut short, holding pages that cannot be read, or a
    record that cannot be read (:class:`CorruptRecord`)."""

    exit_code = 4


class CorruptRecord(CorruptStore):
    """A stored record (a version, a stage) that cannot be read: it does not parse, does not
    match its id, or is not what its key says it is."""


class UnreadableVersion(CorruptRecord):
    """A stored version record that cannot be read; it names the record and why."""

    def __init__(self, repo: str, version_id: bytes, reason: str):
        self.repo = repo
        self.version_id = version_id
        self.reason = reason
        super().__init__(f"version record {repo}@{version_id.hex()} is unreadable: {reason}")


class ChunkNotFound(NotFound):
    """A chunk id that no store holds."""

    def __init__(self, chunk_id: bytes):
        self.chunk_id = chunk_id
        super().__init__(f"chunk {chunk_id.hex()} is missing from the store")


class StoreFull(ChunkstoreError):
    """The store's disk or map is full; nothing of the failed write was kept."""

    exit_code = 5


class StoreUnavailable(ChunkstoreError):
    """The store cannot be opened or reached."""

    exit_code = 6


class StoreMissing(StoreUnavailable):
    """An embedded store that does not exist, opened to read (only a write may make one)."""


class PermissionDenied(ChunkstoreError):
    """The store refused the caller (no token, an unknown one, or one whose scope is too low),
    a local directory or file cannot be read, or an embedded store cannot be written (its
    files are another user's, or on a read-only file system)."""

    exit_code = 7


class ChunkstoreWarning(UserWarning):
    """Something a user should know of that does not stop the call: a listing that left out a
    record it cannot read, say. The CLI prints each as a ``warning:`` line."""
