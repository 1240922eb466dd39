"""Checkpoint folders written so that a save never loses data, whatever kills it.

A folder cannot replace a non-empty folder atomically (os.replace refuses), and swapping whole
folders would also delete whatever else the user keeps there. So the folder stays where it is and
only the checkpoint's own files change, in four steps:

1. the new files are written into a staging folder inside it, `PATH/.tmp-<pid>-<random>/`, and
   flushed to disk. Killed here: the old checkpoint is as it was; the next save removes the
   leftover (load never looks at it);
2. a journal, `PATH/.allformers-swap.json`, naming the staging folder, the new files and the old
   checkpoint's files that the new one drops, is renamed into place. From this instant the save is
   committed: whoever finds the journal finishes it;
3. each new file is renamed over its old version (os.replace, atomic per file); dropped files move
   into the staging folder; the manifest `PATH/.allformers-files.json` (the checkpoint's own files)
   is one of the new files;
4. the journal is deleted, then the staging folder.

Steps 2-4 run under an exclusive lock on the folder (flock) and `load` reads under a shared one,
so a reader sees the old files or the new ones, never a mix. A reader that finds a journal (the
saver was killed in step 3) finishes the renames before reading. Files beside the checkpoint that
are not its own (notes, a summary.json, a README) are never touched, and a folder that holds
something but no checkpoint is refused unless overwrite=True.

ALLFORMERS_SAVE_FAULT=<step> kills the saving process at that step (SIGKILL), for the
fault-injection tests: before-write, mid-write, staged, mid-swap, swapped."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import warnings
from pathlib import Path

from safetensors import SafetensorError

from ..errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock; saves stay atomic per file, readers are not serialised
    fcntl = None

STAGING = ".tmp-"  # PATH/.tmp-<pid>-<random>/: a save in progress (or a killed one's leftover)
JOURNAL = ".allformers-swap.json"  # present only while a committed save is being moved into place
MANIFEST = ".allformers-files.json"  # the checkpoint's own files, written by every save
# The files a checkpoint written by allformers, Hugging Face or diffusers consists of: what our savers write
# and our loaders read (trainer_state.pt: training/trainer.py, adapter.safetensors: models/lora.py,
# discriminator/ generator/: ELECTRA's two-network checkpoints). A checkpoint saved before the
# manifest existed is recognised by these; only they are replaced or dropped by a new save.
OWN_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "1_Pooling",
             "trainer_state.pt", "adapter.safetensors", "discriminator", "generator",
             "diffusion_pytorch_model.safetensors")
# What a training run writes into its output folder (training/trainer.py, the recipes): a model saved
# into a run's folder goes beside them without overwrite=True (they are never touched either way).
RUN_RECORDS = ("metrics.jsonl", "metrics.prev.jsonl", "loss.png", "checkpoint", "summary.json")
ASIDE_RECORDS = re.compile(r"^(metrics|loss)\.prev(-\d+)?\.(jsonl|png)$")  # an earlier run's, kept aside (training/guards.py)
FAULT_STEPS = ("before-write", "mid-write", "staged", "mid-swap", "swapped")


def fault(step: str) -> None:
    """Kill this process at `step` when ALLFORMERS_SAVE_FAULT names it (fault-injection tests)."""
    if os.environ.get("ALLFORMERS_SAVE_FAULT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def internal(name: str) -> bool:
    """Names of our bookkeeping inside a checkpoint folder (not the user's, not the checkpoint's)."""
    return name.startswith(STAGING) or name in (JOURNAL, MANIFEST)


# ---------------------------------------------------------------------- what a folder holds
def _is_checkpoint(path: Path) -> bool:
    if (path / MANIFEST).is_file() or (path / "trainer_state.pt").is_file():
        return True
    for config in (path / "config.json", path / "discriminator" / "config.json"):
        try:
            raw = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and any(k in raw for k in ("model_type", "config_class", "n_embd", "_class_name")):
            return True
    return False


def own_files(path: Path):
    """The names of the checkpoint's own files in `path`, or None when it holds no checkpoint."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return [n for n in manifest["files"] if os.path.lexists(path / n) and n != MANIFEST]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not _is_checkpoint(path):
        return None
    names = [n for n in OWN_FILES if os.path.lexists(path / n)]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):  # sharded: the shards too
        try:
            names += sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return sorted(set(n for n in names if "/" not in n and os.path.lexists(path / n)))


def _shown(names, n=4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n})" if len(names) > n else "")


def check_destination(path: Path, overwrite: bool = False) -> None:
    """Refuse a destination a save would damage: a file, or a folder holding something but no checkpoint."""
    if os.path.lexists(path) and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint folder; save to another path "
                              f"(a save never replaces a file with a folder, not even with overwrite)")
    parent = path
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {path}: {parent} is a file; choose a folder that is not under a file")
    if not path.is_dir():
        return
    try:
        entries = [e for e in os.listdir(path) if not internal(e)]
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); save to a folder you can read and write") from None
    if entries and not overwrite and own_files(path) is None and not all(
            e in RUN_RECORDS or ASIDE_RECORDS.match(e) for e in entries):
        raise CheckpointError(
            f"{path} is not empty and holds no checkpoint ({_shown(entries)}); save to a new or empty folder, "
            f"or pass overwrite=True (CLI: --overwrite) to add the checkpoint's files beside them "
            f"(nothing else in the folder is touched)")


# ---------------------------------------------------------------------- locks and disk flushes
@contextlib.contextmanager
def locked(path: Path, exclusive: bool):
    """flock on the folder itself: savers' renames are exclusive, readers share. Where the file
    system has no flock (or no fcntl), this is a no-op and only the per-file atomicity remains."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        fd = None
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode(folder: Path) -> int:
    """0o666 under the user's umask (read from a fresh file: os.umask would change it process-wide)."""
    probe = folder / ".mode"
    os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(os.stat(probe).st_mode)
    os.remove(probe)
    return mode


def _finish_files(root: Path) -> None:
    """Give every staged file the user's umask (safetensors writes 0600 files) and flush it, so the
    journal never names data that a power cut could lose."""
    mode = _file_mode(root)
    for folder, _, files in os.walk(root):
        for f in files:
            if stat.S_IMODE(os.lstat(Path(folder) / f).st_mode) != mode and not os.path.islink(Path(folder) / f):
                os.chmod(Path(folder) / f, mode)
            _fsync(Path(folder) / f)
        _fsync(Path(folder))


# ---------------------------------------------------------------------- the swap (steps 2-4)
def _read_journal(path: Path) -> dict:
    try:
        journal = json.loads((path / JOURNAL).read_text())
        journal["staging"], journal["files"], journal["remove"]  # noqa: B018  (all three must be there)
        return journal
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path / JOURNAL} (the journal of an interrupted save) is unreadable ({e}); the new checkpoint's "
            f"files, if any, are in {path}/{STAGING}*: move them into {path} and delete the journal") from None


def _move_aside(item: Path, trash: Path) -> None:
    trash.mkdir(exist_ok=True)
    target = trash / item.name
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif os.path.lexists(target):
        target.unlink()
    os.replace(item, target)


def roll_forward(path: Path, journal: dict) -> None:
    """Steps 3 and 4: idempotent, so a save killed half-way is finished by whoever comes next."""
    staging = path / journal["staging"]
    trash = staging / ".replaced"
    for name in journal["files"]:
        src, dst = staging / name, path / name
        if not os.path.lexists(src):
            continue  # moved already
        if dst.is_dir() and not dst.is_symlink():  # a folder (1_Pooling/) cannot be renamed over another
            _move_aside(dst, trash)
        os.replace(src, dst)
        fault("mid-swap")
    for name in journal["remove"]:  # files of the old checkpoint that the new one does not have
        if os.path.lexists(path / name):
            _move_aside(path / name, trash)
    _fsync(path)
    fault("swapped")
    os.remove(path / JOURNAL)
    _fsync(path)
    shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted_save(path: Path) -> None:
    """Complete a save that was killed after it committed; say exactly where the data is if we cannot."""
    with locked(path, exclusive=True):
        if not (path / JOURNAL).exists():
            return  # someone else finished it
        journal = _read_journal(path)
        try:
            roll_forward(path, journal)
        except OSError as e:
            raise CheckpointError(
                f"a save into {path} was interrupted after it finished writing, and its files could not be moved "
                f"into place ({e.strerror}): the new checkpoint's files {_shown(journal['files'])} are in "
                f"{path / journal['staging']}; move them into {path} and delete {path / JOURNAL}") from None
    warnings.warn(f"finished an interrupted save into {path}", stacklevel=5)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_leftovers(path: Path, keep: Path) -> None:
    """Remove staging folders of killed saves (their process is gone), and the sibling temporary
    folders `.NAME.tmp-*` that saves of earlier allformers versions left behind."""
    for name in os.listdir(path):
        if not name.startswith(STAGING) or name == keep.name:
            continue
        pid = name[len(STAGING):].split("-")[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue  # a save running in another process
        shutil.rmtree(path / name, ignore_errors=True)
    prefix = f".{path.name}.tmp-"
    for name in os.listdir(path.parent):
        if name.startswith(prefix) and (path.parent / name).is_dir():
            shutil.rmtree(path.parent / name, ignore_errors=True)


def _write_error(e: OSError, path: Path) -> CheckpointError:
    why = {errno.ENOSPC: "the disk is full; free some space", errno.EDQUOT: "the disk quota is exceeded; free some space",
           errno.EROFS: "the file system is read-only; save to a writable folder",
           errno.EACCES: "permission denied; save to a folder you can write",
           errno.EPERM: "permission denied; save to a folder you can write"}.get(e.errno, "check the path")
    return CheckpointError(f"could not write the checkpoint to {path} ({e.strerror or e}): {why} and save again; "
                           f"nothing at {path} was changed")


def _as_os_error(e: Exception):
    """safetensors and torch.save report a failed write as their own errors: recover the OSError."""
    code = re.search(r"os error (\d+)", str(e))
    if code:
        return OSError(int(code[1]), os.strerror(int(code[1])))
    if "PytorchStreamWriter failed" in str(e) or "file write failed" in str(e):
        return OSError(errno.EIO, f"torch.save failed ({e}); is the disk full?")
    return None


def atomic_folder_write(path, write_into, overwrite: bool = False) -> Path:
    """Write a checkpoint folder at `path`: `write_into(folder)` writes the files into a staging
    folder, which then replaces the checkpoint's own files as described at the top of this module.
    A crash, a kill or a full disk at any point leaves the old checkpoint or the new one at `path`."""
    path = Path(path)
    check_destination(path, overwrite)
    staging = path / f"{STAGING}{os.getpid()}-{secrets.token_hex(4)}"
    created = [p for p in [path, *path.parents] if not os.path.lexists(p)][::-1]  # removed again on failure
    committed = False
    try:
        fault("before-write")
        path.mkdir(parents=True, exist_ok=True)  # the user's umask, like every other tool
        os.mkdir(staging)
    except OSError as e:
        _remove_empty(created)
        raise _write_error(e, path) from None
    try:
        try:
            write_into(staging)
        except (SafetensorError, RuntimeError) as e:
            os_error = _as_os_error(e)
            if os_error is None:
                raise
            raise os_error from e
        new = sorted(n for n in os.listdir(staging) if not internal(n)) + [MANIFEST]
        (staging / MANIFEST).write_text(json.dumps({"files": new}, indent=1))
        _finish_files(staging)
        fault("staged")
        with locked(path, exclusive=True):
            if (path / JOURNAL).exists():  # an earlier save died mid-swap: finish it first
                roll_forward(path, _read_journal(path))
            check_destination(path, overwrite)  # again, now that nobody else can change the folder
            clean_leftovers(path, keep=staging)
            old = own_files(path) or []
            journal = {"staging": staging.name, "files": new, "remove": sorted(set(old) - set(new))}
            (staging / "journal").write_text(json.dumps(journal))
            _fsync(staging / "journal")
            os.replace(staging / "journal", path / JOURNAL)  # the commit
            committed = True
            _fsync(path)
            roll_forward(path, journal)
    except OSError as e:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)
            raise _write_error(e, path) from e
        raise CheckpointError(f"the save into {path} was committed but could not be moved into place "
                              f"({e.strerror or e}); allformers.load({str(path)!r}) finishes it") from e
    except BaseException:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)
        raise
    return path


def _remove_empty(folders) -> None:
    """A failed save leaves no new empty folders behind (the deepest first; never a pre-existing one)."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


# ---------------------------------------------------------------------- readers
def _recover_legacy(path: Path) -> None:
    """Saves of earlier allformers versions swapped whole folders; one killed between its two renames
    left no folder at `path` and the previous checkpoint in `.NAME.old-PID`: put it back."""
    if os.path.lexists(path) or not path.parent.is_dir():
        return
    olds = sorted(p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.old-") and p.is_dir())
    if len(olds) == 1:
        os.replace(olds[0], path)
        warnings.warn(f"{path} was missing after an interrupted save: restored it from {olds[0]}", stacklevel=5)
    elif olds:
        raise CheckpointError(f"{path} does not exist, but interrupted saves left earlier checkpoints in "
                              f"{', '.join(map(str, olds))}; rename the one you want to {path}")


@contextlib.contextmanager
def reading(path: Path):
    """Hold a shared lock on a checkpoint folder while it is read; finish an interrupted save first."""
    path = Path(path)
    _recover_legacy(path)
    if not path.is_dir():
        yield
        return
    while True:
        with locked(path, exclusive=False):
            if not (path / JOURNAL).exists():
                yield
                return
        finish_interrupted_save(path)


def unfinished_save(path: Path):
    """The staging folder of a save that was killed before it committed, when that is all `path` holds."""
    if not path.is_dir():
        return None
    names = os.listdir(path)
    staged = [n for n in names if n.startswith(STAGING)]
    return path / staged[0] if staged and all(internal(n) for n in names) else None
