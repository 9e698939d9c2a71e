"""A merged checkpoint pushed to a Hugging Face Hub repo, shard by shard, in one commit.

Each shard is written to a local staging folder, uploaded as soon as it is finished (the LFS
pre-upload of huggingface_hub: the bytes go to the repo's storage but no commit references them
yet) and deleted. `commit()` then makes one commit holding the pre-uploaded shards, the side
files, the index, the model card and `perta_merge.json`, so the repo never shows a half-written
model: before the commit it shows the old state, after it the whole new model. `abort()` commits
nothing (already uploaded blobs stay unreferenced, invisible in the repo).

Local disk holds at most `max_local_shards` output shards at a time (the one being written and
those waiting for or in upload) plus the small side files: the writer waits for an upload to
finish before it starts a shard beyond the bound. The one-pass unlearn builds its shards in the
staging folder itself, out of order (sinks/layered_output.py), so no such bound holds there;
they are uploaded in the same way as each is finished.

Everything a push needs that can be checked without tensor bytes is checked in `open()`, before
the merge streams anything: the repo exists (or is created when asked), the branch exists (or is
created), the token may write (a preupload request, which changes nothing), and the repo does
not already hold weights unless overwriting was asked.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from perta_stream.errors import HubError, UsageError
from perta_stream.sinks.model_output import SAFETENSORS_METADATA
from perta_stream.sinks.output_dir import PARTIAL_MARKER_NAME, AtomicOutputDir, remove_stale_partials
from perta_stream.sinks.shard_writer import ShardRecord, ShardWriter, TensorSpec, encode_header
from perta_stream.sources.checkpoint import INDEX_FILE_NAME, PICKLE_SUFFIXES
from perta_stream.sources.hub_http import HubLocation, hub_error, make_api, parse_hub_location, with_retries

logger = logging.getLogger(__name__)

DEFAULT_MAX_LOCAL_SHARDS = 2
# The staging folders' names in the temporary folder: `perta-hub-out-<hex>.partial`.
STAGING_PREFIX = "perta-hub-out-"
# The Hub stores files below this size in git when it does not treat them as LFS; such a shard
# is kept in memory until the commit, which carries its content.
_REGULAR_FILE_MAX_BYTES = 10 * 2**20
_WAIT_POLL_S = 0.1
_WEIGHT_SUFFIXES = (".safetensors", ".index.json") + PICKLE_SUFFIXES


class HubModelOutput:
    """One merged checkpoint pushed to `hf://ORG/NAME[@BRANCH][/FOLDER]`.

    Args:
        location: where to push.
        branch: the branch to commit to (None: the repo's default branch); may also be given in `location`.
        private: create the repo private, and refuse to push to an existing public repo.
        create_repo: create the repo when it does not exist (else that is an error).
        commit_message: the commit's title.
        overwrite: allow replacing weights already in the repo (stale shards are deleted in the same commit).
        max_local_shards: output shards on local disk at once, at least 1.
        staging_root: folder for the staging directory (default: the system temporary folder).
    """

    def __init__(
        self,
        location: str,
        *,
        branch: str | None = None,
        private: bool = False,
        create_repo: bool = False,
        commit_message: str = "Upload model merged with perta-stream",
        overwrite: bool = False,
        max_local_shards: int = DEFAULT_MAX_LOCAL_SHARDS,
        staging_root: str | None = None,
    ):
        parsed = parse_hub_location(location)
        if parsed.revision and branch and parsed.revision != branch:
            raise UsageError(f"--out {location} names branch {parsed.revision!r} but --revision says {branch!r}; give one")
        if max_local_shards < 1:
            raise UsageError("--max-local-shards must be at least 1")
        self.location = location
        self._target = HubLocation(parsed.repo_id, parsed.revision or branch, parsed.path_in_repo)
        self._private = private
        self._create_repo = create_repo
        self._commit_message = commit_message
        self._overwrite = overwrite
        self._max_local_shards = max_local_shards
        self._staging_root = staging_root
        self._api = make_api()
        self._staging: Path | None = None
        self._staging_dir: AtomicOutputDir | None = None
        self._writer: ShardWriter | None = None
        self._bounded: set[str] = set()  # shards begun through begin_shard (holding a slot)
        self._finished: dict[str, ShardRecord] = {}
        self._small_files: dict[str, bytes] = {}
        self._uploaded: dict[str, object] = {}
        self._stale_files: list[str] = []
        self._slots = threading.Semaphore(max_local_shards)
        self._pool: ThreadPoolExecutor | None = None
        self._uploads: list[Future] = []
        self._failure: BaseException | None = None
        self._aborted = threading.Event()
        self._lock = threading.Lock()
        self._staged_bytes = 0
        self.peak_staged_bytes = 0

    @classmethod
    def from_config(cls, out_location: str, config) -> "HubModelOutput":
        """Build from a MergeConfig for one of its output locations."""
        alpha = config.alphas[config.out_dirs.index(out_location)] if out_location in config.out_dirs else config.alphas[0]
        message = config.hub_commit_message or f"perta-stream merge: method {config.method}, alpha {alpha:g}"
        return cls(
            out_location,
            branch=config.hub_revision,
            private=config.hub_private,
            create_repo=config.hub_create_repo,
            commit_message=message,
            overwrite=config.overwrite,
            max_local_shards=getattr(config, "hub_max_local_shards", DEFAULT_MAX_LOCAL_SHARDS),
        )

    # ------------------------------------------------------------------ ModelOutput
    def open(self, fingerprint: str) -> dict[str, ShardRecord]:
        """Check (and prepare) the repo and branch, then create the staging folder.

        Returns:
            {}: a Hub push always writes every shard (uploads of bytes the repo's storage
            already holds are skipped by the LFS protocol, so a rerun transfers little).

        Raises:
            HubError: missing repo (without create_repo), refused token, no write access,
                public repo with private asked, weights present without overwrite.
        """
        target, repo_id = self._target, self._target.repo_id
        info = self._repo_info(None)
        if info is None:
            if not self._create_repo:
                raise HubError(
                    f"--out {self.location}: the repo does not exist, or the token cannot see it; create it, "
                    "pass --create-repo, or log in with `hf auth login`"
                )
            with_retries(
                lambda: self._api.create_repo(repo_id, private=self._private, exist_ok=True),
                action="creating",
                location=self.location,
            )
            info = self._repo_info(None)
            if info is None:
                raise HubError(f"--out {self.location}: the repo was created but cannot be read back; retry later")
        if self._private and info.private is False:
            raise HubError(
                f"--out {self.location}: the repo is public but --private was given; make it private on the Hub "
                "first, or drop --private"
            )
        if target.revision and self._repo_info(target.revision) is None:
            with_retries(
                lambda: self._api.create_branch(repo_id, branch=target.revision, exist_ok=True),
                action="creating branch",
                location=self.location,
            )
        branch_info = self._repo_info(target.revision) or info
        self._stale_files = self._existing_weights(branch_info)
        if self._stale_files and not self._overwrite:
            listed = ", ".join(self._stale_files[:3])
            raise HubError(
                f"--out {self.location} already holds model weights ({listed}); pass --overwrite to replace them "
                "in one commit, or choose another repo, branch or folder"
            )
        self._probe_write_access()
        # Marked and locked while this run lives; a killed run's is removed by the next push.
        remove_stale_partials(self._staging_root, STAGING_PREFIX)
        self._staging_dir = AtomicOutputDir(Path(self._staging_root or tempfile.gettempdir()) / f"{STAGING_PREFIX}{uuid.uuid4().hex}", overwrite=False)
        self._staging = self._staging_dir.open()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perta-hub-upload")
        return {}

    def begin_shard(self, file_name: str, tensors: Sequence[TensorSpec]) -> ShardWriter:
        self._raise_failure()
        while not self._slots.acquire(timeout=_WAIT_POLL_S):
            self._raise_failure()
            if self._aborted.is_set():
                raise HubError(f"--out {self.location}: the push was aborted")
        self._writer = ShardWriter(self.staging_path(file_name), tensors, SAFETENSORS_METADATA)
        with self._lock:
            self._bounded.add(file_name)
            self._staged_bytes += len(encode_header(tensors, SAFETENSORS_METADATA)) + sum(spec.nbytes for spec in tensors)
            self.peak_staged_bytes = max(self.peak_staged_bytes, self._staged_bytes)
        return self._writer

    def shard_finished(self, record: ShardRecord) -> None:
        """Upload a shard complete under its final name in the staging folder (written by
        `begin_shard`'s writer, or built there by another writer)."""
        self._writer = None
        with self._lock:
            if record.file_name not in self._bounded:
                self._staged_bytes += record.size_bytes
                self.peak_staged_bytes = max(self.peak_staged_bytes, self._staged_bytes)
        self._finished[record.file_name] = record
        assert self._pool is not None
        self._uploads.append(self._pool.submit(self._upload_shard, record))

    def finished_shards(self) -> dict[str, ShardRecord]:
        return dict(self._finished)

    def write_file(self, file_name: str, data: bytes) -> None:
        self._small_files[file_name] = bytes(data)

    def staging_path(self, file_name: str) -> Path:
        return self.partial / file_name

    @property
    def partial(self) -> Path:
        """The local folder the output is staged in until the commit (a local output's `<out>.partial/`)."""
        if self._staging is None:
            raise HubError(f"--out {self.location}: the output was not opened")
        return self._staging

    def commit(self) -> str:
        """Wait for the uploads, then make the one commit; return `hf://ORG/NAME@COMMIT[/FOLDER]`.

        Raises:
            HubError: an upload or the commit failed; nothing was committed.
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        try:
            for upload in self._uploads:
                upload.exception()
            self._raise_failure()
            target = self._target
            operations: list = [self._uploaded[name] for name in self._finished]
            staged = sorted(p for p in self._staging.iterdir() if p.is_file() and p.name not in self._finished and p.name != PARTIAL_MARKER_NAME)
            operations += [CommitOperationAdd(path_in_repo=target.file_path(p.name), path_or_fileobj=str(p)) for p in staged]
            operations += [CommitOperationAdd(path_in_repo=target.file_path(n), path_or_fileobj=d) for n, d in self._small_files.items()]
            written = {op.path_in_repo for op in operations}
            operations += [CommitOperationDelete(path_in_repo=path) for path in self._stale_files if path not in written]
            info = with_retries(
                lambda: self._api.create_commit(
                    target.repo_id,
                    operations,
                    commit_message=self._commit_message,
                    revision=target.revision,
                    num_threads=1,
                ),
                action="committing to",
                location=self.location,
            )
        except BaseException:
            self.abort()
            raise
        self._cleanup()
        logger.info("committed %s to %s; peak local staging %d bytes", info.oid, self.location, self.peak_staged_bytes)
        return target.pinned(info.oid)

    def abort(self) -> None:
        """Stop uploading and drop the staging folder; nothing is committed."""
        self._aborted.set()
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        # Do not wait for an upload in flight: it fails harmlessly once its file is gone.
        self._cleanup(wait=False)

    def note_stopped(self, reason: str) -> None:
        """Nothing to note: a push that stops leaves nothing behind (its staging folder goes)."""

    def close(self) -> None:
        """Nothing is held between runs (a commit or abort has already ended the upload)."""

    # ------------------------------------------------------------------ internals
    def _upload_shard(self, record: ShardRecord) -> None:
        """Pre-upload one finished shard, then delete it locally (runs on the upload thread)."""
        from huggingface_hub import CommitOperationAdd

        path = self.staging_path(record.file_name)
        try:
            if self._aborted.is_set() or self._failure is not None:
                return
            operation = CommitOperationAdd(path_in_repo=self._target.file_path(record.file_name), path_or_fileobj=str(path))
            if record.sha256:
                # The writer hashed the shard while writing it; reuse that instead of reading it again.
                operation.upload_info.sha256 = bytes.fromhex(record.sha256)
            try:
                self._api.preupload_lfs_files(self._target.repo_id, additions=[operation], revision=self._target.revision, num_threads=1)
            except Exception as exc:  # noqa: BLE001  (huggingface_hub already retried transient failures)
                raise hub_error(exc, action=f"uploading {record.file_name} to", location=self.location) from None
            if getattr(operation, "_upload_mode", "lfs") == "regular":
                # Not stored as LFS by this repo: the commit must carry the content itself.
                if record.size_bytes > _REGULAR_FILE_MAX_BYTES:
                    raise HubError(f"--out {self.location}: the Hub wants {record.file_name} as a plain git file; it is too large")
                operation = CommitOperationAdd(path_in_repo=operation.path_in_repo, path_or_fileobj=path.read_bytes())
            self._uploaded[record.file_name] = operation
            logger.info("uploaded %s to %s", record.file_name, self.location)
        except BaseException as exc:
            with self._lock:
                self._failure = self._failure or exc
        finally:
            path.unlink(missing_ok=True)
            with self._lock:
                self._staged_bytes -= record.size_bytes
                held_slot = record.file_name in self._bounded
            if held_slot:
                self._slots.release()

    def _raise_failure(self) -> None:
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure

    def _repo_info(self, revision: str | None):
        """The repo's info at `revision`, or None when the repo (or that revision) does not exist."""
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        def call():
            try:
                return self._api.model_info(self._target.repo_id, revision=revision)
            except RevisionNotFoundError:
                if revision is None:
                    raise
                return None
            except RepositoryNotFoundError:
                return None

        return with_retries(call, action="checking", location=self.location)

    def _existing_weights(self, info) -> list[str]:
        prefix = f"{self._target.path_in_repo}/" if self._target.path_in_repo else ""
        names = [s.rfilename for s in info.siblings or []]
        return sorted(
            name for name in names
            if name.startswith(prefix) and "/" not in name[len(prefix):] and name.endswith(_WEIGHT_SUFFIXES)
        )

    def _probe_write_access(self) -> None:
        """Ask the preupload endpoint about an empty file: it needs write access and changes nothing."""
        from huggingface_hub import CommitOperationAdd

        probe = CommitOperationAdd(path_in_repo=self._target.file_path(INDEX_FILE_NAME), path_or_fileobj=b"")
        with_retries(
            lambda: self._api.preupload_lfs_files(self._target.repo_id, additions=[probe], revision=self._target.revision),
            action="checking write access to",
            location=self.location,
        )

    def _cleanup(self, *, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._staging_dir is not None:
            self._staging_dir.release()
            self._staging_dir = None
