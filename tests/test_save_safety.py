"""Saving never loses data (checkpoints/atomic.py): fault injection at every step of a save (a
killed process, a full disk, a read-only destination), refusals of destinations that are not
checkpoints, the user's files beside a checkpoint, leftovers, permissions and dtypes.

After every fault the path loads the old checkpoint or the new one, and every user file is
byte-identical (by hash)."""
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from allformers import CheckpointError, Config, TransformerLM, load
from allformers.checkpoints import atomic
from allformers.tokenization import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, block_size=16, **kw)).eval()


def same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hashes(root: Path, skip=None) -> dict:
    """sha256 of every file under root (except under `skip`, the checkpoint folder's own files)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (skip and p.parent == skip and p.name in skip_names(skip)):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def skip_names(folder: Path) -> set:
    return set(atomic.OWN_FILES) | {atomic.MANIFEST, atomic.JOURNAL}


def user_files(root: Path) -> dict:
    """Files a user keeps beside and inside the checkpoint folder: never touched by a save."""
    (root / "notes.txt").write_text("my notes\n")
    (root / "ckpt").mkdir(exist_ok=True)
    (root / "ckpt" / "thesis.tex").write_text("\\documentclass{article}\n")
    (root / "ckpt" / "summary.json").write_text('{"accuracy": 0.9}\n')
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in
            (root / "notes.txt", root / "ckpt" / "thesis.tex", root / "ckpt" / "summary.json")}


def assert_untouched(files: dict):
    for p, h in files.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == h, f"{p} was changed"


def no_leftovers(path: Path):
    assert not [n for n in os.listdir(path) if n.startswith(atomic.STAGING) or n == atomic.JOURNAL]


def killed_save(model, path, step, **save_kw) -> int:
    """Save in a forked child that SIGKILLs itself at `step`; returns the child's wait status signal."""
    pid = os.fork()
    if pid == 0:  # child: nothing but the save, then die (os._exit if the step never came)
        try:
            torch.set_num_threads(1)
            os.environ["ALLFORMERS_SAVE_FAULT"] = step
            model.save(path, **save_kw)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


# ---------------------------------------------------------------------- killed at each step
@pytest.mark.parametrize("step", atomic.FAULT_STEPS)
def test_save_killed_at_each_step_leaves_old_or_new(tmp_path, step):
    old, new = tiny(0), tiny(1)
    path = tmp_path / "ckpt"
    old.save(path, tokenizer=Tokenizer.char("abc"))
    files = user_files(tmp_path)
    assert killed_save(new, path, step) == signal.SIGKILL
    assert_untouched(files)
    back = load(path)  # finishes a committed save by itself
    committed = atomic.FAULT_STEPS.index(step) >= atomic.FAULT_STEPS.index("mid-swap")
    assert same(back, new if committed else old), step
    assert (getattr(back, "tokenizer", None) is None) == committed  # the new save has no tokenizer: the old one's files go
    no_leftovers(path) if committed else None
    tiny(2).save(path)  # the next save cleans whatever the killed one left
    no_leftovers(path)
    assert same(load(path), tiny(2))
    assert_untouched(files)


@pytest.mark.parametrize("step", atomic.FAULT_STEPS)
def test_first_save_killed_leaves_nothing_or_new(tmp_path, step):
    path = tmp_path / "fresh"
    assert killed_save(tiny(1), path, step) == signal.SIGKILL
    if atomic.FAULT_STEPS.index(step) >= atomic.FAULT_STEPS.index("mid-swap"):
        assert same(load(path), tiny(1))
    elif path.exists():  # killed before the commit: the folder says why it holds nothing
        with pytest.raises(CheckpointError, match="killed before it finished.*save the model again"):
            load(path)
    tiny(2).save(path)
    no_leftovers(path)
    assert same(load(path), tiny(2))


@pytest.mark.slow
def test_kill_from_a_fresh_process_via_the_environment(tmp_path):
    """The same fault, placed by ALLFORMERS_SAVE_FAULT in a separate interpreter."""
    path = tmp_path / "ckpt"
    tiny(0).save(path)
    files = user_files(tmp_path)
    code = ("import torch; from allformers import Config, TransformerLM; torch.manual_seed(1); "
            "TransformerLM(Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, block_size=16)).save(%r)" % str(path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLFORMERS_SAVE_FAULT": "mid-swap"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (path / atomic.JOURNAL).exists()  # killed between its renames
    assert same(load(path), tiny(1)) and not (path / atomic.JOURNAL).exists()
    assert_untouched(files)


def test_interrupted_save_on_a_read_only_folder_says_where_the_data_is(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    tiny(0).save(path)
    assert killed_save(tiny(1), path, "mid-swap") == signal.SIGKILL

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.os, "replace", read_only)
    with pytest.raises(CheckpointError) as e:
        load(path)
    staging = next(n for n in os.listdir(path) if n.startswith(atomic.STAGING))
    assert str(path / staging) in str(e.value) and "move them into" in str(e.value)
    monkeypatch.undo()
    assert same(load(path), tiny(1))


# ---------------------------------------------------------------------- full disk, read-only destination
@pytest.mark.parametrize("step", ["before-write", "mid-write", "staged", "mid-swap", "swapped"])
def test_disk_full_at_each_step(tmp_path, monkeypatch, step):
    path = tmp_path / "ckpt"
    tiny(0).save(path)
    files = user_files(tmp_path)

    def full(at):
        if at == step:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "fault", full)
    monkeypatch.setattr("allformers.checkpoints.files.fault", full)  # the one folder writer
    with pytest.raises(CheckpointError) as e:
        tiny(1).save(path)
    monkeypatch.undo()
    committed = atomic.FAULT_STEPS.index(step) >= atomic.FAULT_STEPS.index("mid-swap")
    assert ("load(" if committed else "disk is full") in str(e.value)
    assert same(load(path), tiny(1) if committed else tiny(0))
    no_leftovers(path)
    assert_untouched(files)


@contextmanager
def tmpfs(where: Path, size: str):
    """A real small file system (root only, where mounting is allowed); skips the test otherwise."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_really_full_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "256k") as disk:
        tiny(0).save(disk / "ckpt")
        files = user_files(disk)
        big = TransformerLM(Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, block_size=16))  # ~1 MB
        with pytest.raises(CheckpointError, match="disk is full"):
            big.save(disk / "ckpt")
        assert same(load(disk / "ckpt"), tiny(0))
        no_leftovers(disk / "ckpt")
        assert_untouched(files)
        with pytest.raises(CheckpointError, match="disk is full"):
            big.save(disk / "other")
        assert not (disk / "other").exists()  # no empty folder left by the failed save


def test_read_only_destination(tmp_path):
    with tmpfs(tmp_path / "ro", "4m") as fs:
        tiny(0).save(fs / "ckpt")
        files = user_files(fs)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with pytest.raises(CheckpointError, match="read-only"):
            tiny(1).save(fs / "ckpt")
        with pytest.raises(CheckpointError, match="read-only"):
            tiny(1).save(fs / "new")
        assert same(load(fs / "ckpt"), tiny(0))  # reading a read-only checkpoint works
        assert_untouched(files)


def test_read_only_destination_simulated(tmp_path, monkeypatch):
    """The same on any machine: every write into the folder fails with EROFS."""
    path = tmp_path / "ckpt"
    tiny(0).save(path)
    files = user_files(tmp_path)

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.os, "mkdir", ro)
    with pytest.raises(CheckpointError, match="read-only.*nothing at .* was changed"):
        tiny(1).save(path)
    monkeypatch.undo()
    assert same(load(path), tiny(0))
    assert_untouched(files)


# ---------------------------------------------------------------------- destinations and the user's files
def test_folder_without_a_checkpoint_is_refused_unless_overwrite(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    before = hashes(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds no checkpoint \(thesis.tex\).*overwrite=True"):
        tiny(0).save(d)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        tiny(0).save(d, format="hf")
    assert hashes(tmp_path) == before and os.listdir(d) == ["thesis.tex"]
    tiny(0).save(d, overwrite=True)  # beside the user's file, which stays
    assert (d / "thesis.tex").read_text() == "years of work" and same(load(d), tiny(0))


def test_a_file_is_never_replaced(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"precious")
    before = hashes(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
            tiny(0).save(f, overwrite=overwrite)
    with pytest.raises(CheckpointError, match="is a file"):
        tiny(0).save(f / "sub")
    assert hashes(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_overwriting_replaces_only_the_checkpoints_own_files(tmp_path):
    path = tmp_path / "ckpt"
    tiny(0).save(path, tokenizer=Tokenizer.char("abc"))
    files = user_files(tmp_path)
    tiny(1).save(path)  # a checkpoint is replaced without overwrite=True
    assert same(load(path), tiny(1))
    assert not (path / "tokenizer.json").exists()  # the old checkpoint's tokenizer does not haunt the new one
    assert_untouched(files)
    assert sorted(os.listdir(path)) == sorted([atomic.MANIFEST, "config.json", "model.safetensors",
                                               "summary.json", "thesis.tex"])


def test_hf_folder_replaced_in_place(tmp_path):
    """A Hugging Face folder (sharded, with a README) overwritten by our format: its weights all go,
    its README stays, and convert back to hf works."""
    path = tmp_path / "hf"
    tiny(0).save(path, format="hf")
    state = load_file(path / "model.safetensors")
    keys = sorted(state)
    (path / "model.safetensors").unlink()
    (path / atomic.MANIFEST).unlink()  # as if written by transformers
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(path / name))
    import json

    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (path / "README.md").write_text("model card")
    assert same(load(path), tiny(0))
    tiny(1).save(path)
    assert sorted(os.listdir(path)) == sorted([atomic.MANIFEST, "README.md", "config.json", "model.safetensors"])
    assert same(load(path), tiny(1))
    tiny(2).save(path, format="hf")
    assert same(load(path), tiny(2)) and (path / "README.md").read_text() == "model card"


def test_umask_is_respected(tmp_path):
    old = os.umask(0o022)
    try:
        tiny(0).save(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, p
    assert stat.S_IMODE((tmp_path / "a" / "b" / "model.safetensors").stat().st_mode) == 0o644


def test_leftovers_of_killed_saves_are_cleaned_but_not_a_running_ones(tmp_path):
    path = tmp_path / "ckpt"
    tiny(0).save(path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (path / f"{atomic.STAGING}{dead.pid}-abcd").mkdir()
    (path / f"{atomic.STAGING}{dead.pid}-abcd" / "model.safetensors").write_bytes(b"x" * 1000)
    alive = path / f"{atomic.STAGING}{os.getppid()}-beef"  # a save in progress in a living process
    alive.mkdir()
    legacy = tmp_path / ".ckpt.tmp-k2j3h4"  # what saves of earlier versions left beside the folder
    legacy.mkdir()
    tiny(1).save(path)
    assert not (path / f"{atomic.STAGING}{dead.pid}-abcd").exists() and not legacy.exists()
    assert alive.exists()


def test_legacy_interrupted_swap_is_recovered(tmp_path):
    """Earlier versions swapped whole folders; killed between the renames, `ckpt` was gone and the
    checkpoint sat in .ckpt.old-PID. load puts it back."""
    path = tmp_path / "ckpt"
    tiny(0).save(path)
    os.replace(path, tmp_path / ".ckpt.old-4242")
    with pytest.warns(UserWarning, match="restored it from"):
        assert same(load(path), tiny(0))
    os.replace(path, tmp_path / ".ckpt.old-1")
    tiny(1).save(tmp_path / ".ckpt.old-2")
    with pytest.raises(CheckpointError, match=r"\.ckpt\.old-1, .*\.ckpt\.old-2; rename the one you want"):
        load(path)


def test_readers_never_see_a_mix(tmp_path):
    """A loader racing a saver sees one whole checkpoint each time (the folder's flock)."""
    path = tmp_path / "ckpt"
    models = [tiny(0), tiny(1)]
    models[0].save(path)
    seen, stop = [], threading.Event()

    def saver():
        i = 0
        while not stop.is_set():
            models[i % 2].save(path)
            i += 1

    t = threading.Thread(target=saver)
    t.start()
    try:
        for _ in range(15):
            back = load(path)
            seen.append(next(i for i, m in enumerate(models) if same(back, m)))  # StopIteration = a mix
    finally:
        stop.set()
        t.join()


# ---------------------------------------------------------------------- dtypes that cannot hold weights
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool, "float16"])
def test_integer_dtypes_are_refused(tmp_path, dtype):
    with pytest.raises(CheckpointError, match="cannot hold the weights.*torch.float16"):
        tiny(0).save(tmp_path / "q", dtype=dtype)
    with pytest.raises(CheckpointError, match="cannot hold the weights"):
        tiny(0).save(tmp_path / "q", format="hf", dtype=dtype)
    assert not (tmp_path / "q").exists()


def test_float_dtypes_still_save(tmp_path):
    tiny(0).save(tmp_path / "h", dtype=torch.float16)
    assert load_file(tmp_path / "h" / "model.safetensors")["wte.weight"].dtype == torch.float16
    assert load(tmp_path / "h").wte.weight.dtype == torch.float32
    tiny(0).save(tmp_path / "hf", format="hf", dtype=torch.bfloat16)
    assert load_file(tmp_path / "hf" / "model.safetensors")["transformer.wte.weight"].dtype == torch.bfloat16


def test_integer_checkpoint_never_loads_as_floats(tmp_path):
    tiny(0).save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    save_file({k: v.to(torch.int8) for k, v in load_file(f).items()}, str(f))
    with pytest.raises(CheckpointError, match="stored as integers .*int8.*re-save it"):
        load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="load\\(dtype=torch.int8\\) cannot hold"):
        load(tmp_path / "m", dtype=torch.int8)
