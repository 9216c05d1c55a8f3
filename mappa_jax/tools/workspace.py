"""Per-episode workspace: the one directory an episode's agents share and the sandbox may write."""
import dataclasses
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping

_EPISODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int


Snapshot = dict[str, FileState]


@dataclasses.dataclass(frozen=True)
class WorkspaceDiff:
    created: tuple[str, ...]
    modified: tuple[str, ...]
    deleted: tuple[str, ...]


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


class Workspace:
    """A directory `root/episode_id`; files one agent writes there are there for the next.

    Hidden material (held-out answers) never belongs here: the sandbox sees exactly this
    directory, so `copy_in(..., forbidden=...)` refuses any file equal to a forbidden one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise FileNotFoundError(f"workspace directory {self.path} does not exist")

    @classmethod
    def create(cls, root: str | os.PathLike, episode_id: str) -> "Workspace":
        """Makes a fresh, empty workspace for one episode (fails if it already exists)."""
        if not _EPISODE_ID.match(episode_id):
            raise ValueError(f"episode_id {episode_id!r} must be 1-128 chars of [A-Za-z0-9._-] "
                             "and not start with '.' or '-'")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / episode_id
        path.mkdir()  # FileExistsError names the path: two episodes must never share one
        return cls(path)

    def __repr__(self):
        return f"Workspace({str(self.path)!r})"

    def _relative_files(self) -> Iterable[tuple[str, Path]]:
        for directory, subdirs, names in os.walk(self.path):
            subdirs.sort()
            for name in sorted(names):
                full = Path(directory, name)
                if full.is_file() and not full.is_symlink():
                    yield full.relative_to(self.path).as_posix(), full

    def list_files(self) -> list[str]:
        """Regular files in the workspace, as sorted relative POSIX paths."""
        return [relative for relative, _ in self._relative_files()]

    def usage(self) -> tuple[int, int]:
        """(bytes, entries): apparent size of every regular file, and files + dirs + links."""
        total = entries = 0
        pending = [str(self.path)]
        while pending:
            try:
                with os.scandir(pending.pop()) as listing:
                    for entry in listing:
                        entries += 1
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append(entry.path)
                            elif entry.is_file(follow_symlinks=False):
                                total += entry.stat(follow_symlinks=False).st_size
                        except OSError:
                            pass  # deleted while we looked
            except OSError:
                pass
        return total, entries

    def snapshot(self) -> Snapshot:
        states = {}
        for relative, full in self._relative_files():
            stat = full.stat()
            states[relative] = FileState(stat.st_size, stat.st_mtime_ns)
        return states

    @staticmethod
    def diff(before: Snapshot, after: Snapshot) -> WorkspaceDiff:
        return WorkspaceDiff(
            created=tuple(sorted(set(after) - set(before))),
            modified=tuple(sorted(name for name in set(after) & set(before)
                                  if after[name] != before[name])),
            deleted=tuple(sorted(set(before) - set(after))),
        )

    def resolve_inside(self, relative: str) -> Path:
        """The absolute path of `relative`, refusing anything that escapes the workspace."""
        target = (self.path / relative).resolve()
        if target != self.path and self.path not in target.parents:
            raise ValueError(f"path {relative!r} is outside workspace {self.path}")
        return target

    def copy_in(self, files: Mapping[str, str | os.PathLike],
                forbidden: Iterable[str | os.PathLike] = ()) -> list[str]:
        """Copies task inputs in: {relative destination: source file}. Returns the destinations.

        Any source that is, or has the same bytes as, a `forbidden` file (e.g. hidden answers)
        is refused with an error naming both, before anything is copied.
        """
        forbidden_paths = [Path(path) for path in forbidden]
        forbidden_digests = {_digest(path): path for path in forbidden_paths if path.is_file()}
        plan = []
        for destination, source in files.items():
            source = Path(source)
            if not source.is_file():
                raise FileNotFoundError(f"task input {source} (for {destination!r}) is not a file")
            for hidden in forbidden_paths:
                if hidden.exists() and os.path.samefile(source, hidden):
                    raise ValueError(f"refusing to copy hidden file {hidden} into the workspace")
            same_bytes = forbidden_digests.get(_digest(source))
            if same_bytes is not None:
                raise ValueError(f"refusing to copy {source}: same contents as hidden file "
                                 f"{same_bytes}")
            plan.append((self.resolve_inside(destination), source))
        for target, source in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        return [target.relative_to(self.path).as_posix() for target, _ in plan]

    def read_text(self, relative: str, max_bytes: int | None = None) -> str:
        with open(self.resolve_inside(relative), "rb") as handle:
            data = handle.read() if max_bytes is None else handle.read(max_bytes)
        return data.decode("utf-8", errors="replace")

    def hand_over(self, uid: int, gid: int) -> None:
        """Makes the workspace owned by the sandbox's host uid (needed when the host is root)."""
        for directory, subdirs, names in os.walk(self.path):
            for name in [directory, *(os.path.join(directory, n) for n in subdirs + names)]:
                stat = os.lstat(name)
                if (stat.st_uid, stat.st_gid) != (uid, gid):
                    os.lchown(name, uid, gid)

    def remove(self) -> None:
        shutil.rmtree(self.path)
