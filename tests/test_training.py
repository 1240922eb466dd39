"""Trainer, data, schedule, recipes and CLI on tiny models (a few seconds in all)."""
import argparse
import json
import math
import urllib.error

import pytest
import torch

from allformers import Config, TransformerLM
from allformers.objectives import CausalLM, causal_lm_loss
from allformers.recipes import UnknownRecipeError, get_recipe
from allformers.training import RandomWindows, TrainConfig, Trainer, TrainingError, build_optimizer, decay_groups, lr_at
from allformers.training import data as data_mod
from allformers.training.mfu import flops_per_token, measured_peak_flops

V, T = 16, 16


def corpus(n=6000, seed=0):
    """A learnable token stream: mostly next = (3 * prev + 1) % V, 20% random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    noise = torch.randint(V, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.2
    for i in range(1, n):
        out[i] = noise[i] if flip[i] else (3 * out[i - 1] + 1) % V
    return out


DATA = corpus()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def tiny_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return TransformerLM(Config(name="tiny", vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32,
                                dropout=dropout))


def tiny_trainer(out=None, dropout=0.0, model_seed=0, eval_data=None, **cfg):
    settings = dict(max_steps=100, batch_size=4, warmup_steps=10, lr=3e-3, min_lr=3e-4, log_interval=1,
                    eval_interval=0, eval_at_start=False)
    settings.update(cfg)
    return Trainer(tiny_model(dropout, model_seed), CausalLM(), RandomWindows(DATA, T, seed=0),
                   TrainConfig(**settings), eval_data=eval_data, out=out, progress=False)


# ---------------------------------------------------------------------- exact resume
def test_resume_is_exact_with_dropout(tmp_path):
    evals = {"val": [RandomWindows(DATA, T, seed=9).sample(4) for _ in range(2)]}
    full = tiny_trainer(tmp_path / "full", dropout=0.2, eval_data=evals, eval_interval=25)
    full.fit()
    first = tiny_trainer(tmp_path / "cut", dropout=0.2, eval_data=evals, eval_interval=25, checkpoint_interval=50)
    first.fit(stop_at=50)  # "crash" after the step-50 checkpoint
    first.train_step()  # work lost in the crash must not leak into the resumed run
    second = tiny_trainer(tmp_path / "cut", dropout=0.2, model_seed=123, eval_data=evals, eval_interval=25,
                          checkpoint_interval=50)
    assert second.load_checkpoint() == 50
    second.fit()
    expected = full.history_train_losses()
    assert len(expected) == 100
    assert second.history_train_losses() == expected  # exact, not approximate
    assert [r["val_loss"] for r in second.history if r["event"] == "eval"] == \
           [r["val_loss"] for r in full.history if r["event"] == "eval"]
    for a, b in zip(full.raw_model.parameters(), second.raw_model.parameters()):
        assert torch.equal(a, b)


def test_resume_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        tiny_trainer(tmp_path).load_checkpoint()


# ---------------------------------------------------------------------- optimisation pieces
def test_schedule_values():
    cfg = TrainConfig(max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx(5.5e-4)  # cosine midpoint
    assert lr_at(2000, cfg) == pytest.approx(1e-4)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg.replace(lr_decay_steps=500)) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(100, 2000))


def test_decay_groups():
    model = tiny_model()
    decay, no_decay = decay_groups(model)
    assert {"wte.weight", "wpe.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.proj.weight"} <= set(decay)
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "norm.weight"} <= set(no_decay)
    params = dict(model.named_parameters())
    assert all(params[n].dim() >= 2 for n in decay) and all(params[n].dim() == 1 for n in no_decay)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


def test_gradient_accumulation_matches_one_big_batch():
    one = tiny_trainer(max_steps=5, batch_size=12, grad_accum=1)
    two = tiny_trainer(max_steps=5, batch_size=12, grad_accum=2)  # 2 micro-batches of 6
    one.fit(), two.fit()
    for a, b in zip(one.history_train_losses(), two.history_train_losses()):
        assert abs(a - b) < 1e-6
    for p, q in zip(one.raw_model.parameters(), two.raw_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_batch_must_split_evenly():
    with pytest.raises(TrainingError, match="multiple of 4"):
        tiny_trainer(batch_size=6, grad_accum=4)


def test_causal_lm_loss_ignores_minus_100():
    model = tiny_model()
    x = torch.randint(V, (2, T))
    y = torch.randint(V, (2, T))
    y_masked = y.clone()
    y_masked[:, : T // 2] = -100
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, T // 2:].reshape(-1, V), y[:, T // 2:].reshape(-1))
    assert torch.allclose(causal_lm_loss(model, (x, y_masked)), expected)


# ---------------------------------------------------------------------- outputs
def test_metrics_plot_and_checkpoint_written(tmp_path):
    import allformers

    evals = {"train": [RandomWindows(DATA, T, 4).sample(4)], "val": [RandomWindows(DATA, T, 3).sample(4)]}
    trainer = tiny_trainer(tmp_path, max_steps=20, log_interval=5, eval_interval=10, eval_data=evals,
                           eval_at_start=True)
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert set(train[0]) >= {"step", "loss", "lr", "tokens_per_s", "mfu"} and train[0]["tokens_per_s"] > 0
    assert 0 < train[0]["mfu"] < 1
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 10, 20]
    assert all("val_loss" in r and "train_loss" in r for r in records if r["event"] == "eval")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["val_loss"] == records[-1]["val_loss"]
    reloaded = allformers.load(tmp_path / "checkpoint")
    for a, b in zip(reloaded.parameters(), trainer.raw_model.parameters()):
        assert torch.equal(a, b)
    # a second run from step 0 in the same folder starts its own curve; the last one is kept aside
    tiny_trainer(tmp_path, max_steps=10, log_interval=5, eval_interval=0).fit()
    again = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert again == [5, 10]
    assert [json.loads(x) for x in (tmp_path / "metrics.prev.jsonl").read_text().splitlines()] == records


def test_mfu_pieces():
    peak = measured_peak_flops("cpu", n=256, seconds=0.05)
    assert peak > 1e8 and measured_peak_flops("cpu", n=256, seconds=0.05) == peak  # cached
    model = TransformerLM.from_name("baby-gpt-char")
    n = model.num_params() - model.wpe.weight.numel()  # tied head: the token table is a matmul
    assert flops_per_token(model, 64) == 6 * n + 12 * 4 * 128 * 64


def test_golden_loss():
    """A pinned number: any change to init, data sampling, schedule or optimizer shows up here."""
    trainer = tiny_trainer(max_steps=30, batch_size=8, dropout=0.1)
    trainer.fit()
    loss = trainer.history_train_losses()[-1]
    assert loss == pytest.approx(GOLDEN_LOSS, abs=1e-4), loss


GOLDEN_LOSS = 1.7823  # measured once (torch 2.13 CPU); fixed seeds make it repeat exactly


# ---------------------------------------------------------------------- data
def test_sampler_windows_and_state():
    s = RandomWindows(torch.arange(100), 8, seed=1)
    x, y = s.sample(5)
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1)  # y is x shifted by one
    state = s.state_dict()
    again = s.sample(3)
    s.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again, s.sample(3)))
    with pytest.raises(data_mod.DataError, match="block_size"):
        RandomWindows(torch.arange(5), 8)


def test_data_root_from_env_and_cwd(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "tinyshakespeare" / "input.txt").write_text("hello world")
    (tmp_path / "proj").mkdir()
    monkeypatch.delenv("ALLFORMERS_DATA", raising=False)
    monkeypatch.chdir(tmp_path / "proj")
    assert data_mod.default_data_root() == (tmp_path / "shared" / "data").resolve()
    assert data_mod.tiny_shakespeare_path().read_text() == "hello world"
    monkeypatch.setenv("ALLFORMERS_DATA", str(tmp_path / "shared" / "data"))
    assert data_mod.default_data_root() == tmp_path / "shared" / "data"
    monkeypatch.setenv("ALLFORMERS_DATA", str(tmp_path / "nope"))
    with pytest.raises(data_mod.DataError, match="ALLFORMERS_DATA"):
        data_mod.default_data_root()


def test_download_fallback(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
        return dest

    monkeypatch.setattr(data_mod, "default_data_root", lambda: None)
    monkeypatch.setenv("ALLFORMERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "download", fake_download)
    path = data_mod.tiny_shakespeare_path()
    assert calls == [data_mod.TINY_SHAKESPEARE_URL]
    assert path == tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    data_mod.tiny_shakespeare_path()
    assert len(calls) == 1  # cached


def test_download_failure_names_the_fix(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data_mod.urllib.request, "urlopen", offline)
    with pytest.raises(data_mod.DataError, match=r"--data \(a folder"):
        data_mod.download(data_mod.TINY_SHAKESPEARE_URL, tmp_path / "x" / "input.txt")
    assert not list((tmp_path / "x").iterdir())  # no partial file left


def test_char_corpus_fast_encoding_matches_tokenizer(tmp_path):
    text = "To be, or not to be: that is the question.\nÆsop's fables — naïve?\n" * 20
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    c = data_mod.char_corpus(tmp_path / "t.txt")
    ids = torch.cat([c.train, c.val]).tolist()
    assert ids == c.tokenizer.encode(text) and len(c.train) == int(0.9 * len(text))
    assert c.tokenizer.decode(ids) == text


# ---------------------------------------------------------------------- recipes and CLI
def test_unknown_recipe_names_close_matches():
    with pytest.raises(UnknownRecipeError) as e:
        get_recipe("shakespeare-cpu")
    assert "shakespeare-char-cpu" in str(e.value)
    from allformers.errors import AllformersError

    assert isinstance(e.value, AllformersError)


def test_recipe_settings_match_nanogpt():
    """The issue fixes nanoGPT's shape, batch, steps and no dropout; the rest is nanoGPT's too except
    the learning rate: 3e-3 (and min 3e-4) instead of 1e-3, which missed the 1.89 target here."""
    r = get_recipe("shakespeare-char-cpu")
    c = r.train
    assert (c.max_steps, c.batch_size, c.lr, c.min_lr, c.warmup_steps, c.beta2, c.weight_decay, c.grad_clip,
            c.eval_interval, r.eval_iters) == (2000, 12, 3e-3, 3e-4, 100, 0.99, 0.1, 1.0, 250, 20)
    assert r.model_overrides["block_size"] == 64 and r.model_overrides["dropout"] == 0.0
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_cli_train_tiny_run(tmp_path, capsys):
    pytest.importorskip("tqdm")
    if data_mod.default_data_root() is None:
        pytest.skip("Tiny Shakespeare is not available offline here")
    from allformers.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--recipe", "shakespeare-char-cpu", "--out", str(tmp_path),
                              "--max-steps", "4", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                              "--eval-iters", "2", "--eval-interval", "2", "--samples", "1", "--no-progress",
                              "--json"])
    assert args.handler(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and math.isfinite(result["val_loss"]) and result["params"] < 100_000
    assert (tmp_path / "checkpoint" / "tokenizer.json").exists() and (tmp_path / "loss.png").exists()
    assert len(result["samples"]) == 1 and len(result["samples"][0]) > 100
    # --resume with a larger --max-steps continues from step 4
    args = parser.parse_args(["train", "--out", str(tmp_path), "--max-steps", "6", "--n-layer", "1",
                              "--n-embd", "32", "--n-head", "2", "--eval-iters", "2", "--eval-interval", "2",
                              "--samples", "0", "--no-progress", "--json", "--resume"])
    assert args.handler(args) == 0
    result = json.loads(capsys.readouterr().out)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result["step"] == 6 and steps == sorted(steps) and steps[-1] == 6


# ---------------------------------------------------------------------- an earlier run's records (issue 17)
def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class CrashAt:
    """A loss that fails at its n-th call: a run that starts well and dies mid-way."""

    def __init__(self, n):
        self.calls, self.n, self.loss = 0, n, CausalLM()

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("out of memory (simulated)")
        return self.loss(model, batch)


def test_a_failed_start_never_deletes_an_earlier_runs_records(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        tiny_trainer(tmp_path, max_steps=4, log_interval=2).fit()  # the earlier run
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "checkpoint").stat().st_mode) == 0o755  # the user's umask, not 0700
    earlier = _bytes(tmp_path)
    assert {"metrics.jsonl", "loss.png"} <= set(earlier)
    # refused settings: nothing in the folder changes
    for bad in (dict(batch_size=0), dict(lr=-1e-3), dict(eval_interval=-1), dict(device="cuda:99")):
        with pytest.raises(TrainingError):
            tiny_trainer(tmp_path, **bad).fit()
        assert _bytes(tmp_path) == earlier, bad
    # a run that starts and dies: the earlier records are aside, byte for byte
    crashing = Trainer(tiny_model(), CrashAt(3), RandomWindows(DATA, T, seed=0),
                       TrainConfig(max_steps=4, batch_size=4, log_interval=1, eval_interval=0), out=tmp_path,
                       progress=False)
    with pytest.raises(RuntimeError, match="simulated"):
        crashing.fit()
    now = _bytes(tmp_path)
    assert now["metrics.prev.jsonl"] == earlier["metrics.jsonl"] and now["loss.prev.png"] == earlier["loss.png"]
    # the retry: the crashed run's records go aside too, the earlier run's stay where they are
    tiny_trainer(tmp_path, max_steps=2, log_interval=1).fit()
    now = _bytes(tmp_path)
    assert now["metrics.prev.jsonl"] == earlier["metrics.jsonl"] and now["loss.prev.png"] == earlier["loss.png"]
    assert [json.loads(x)["step"] for x in now["metrics.prev-2.jsonl"].decode().splitlines()] == [1, 2]
    assert [json.loads(x)["step"] for x in now["metrics.jsonl"].decode().splitlines()] == [1, 2]
    # a model saved into the run's folder goes beside its records without overwrite=True
    tiny_model().save(tmp_path)


KILL_AT_STEP = """
import os, signal, sys
from allformers.training import trainer
step = trainer.Trainer.train_step
def killed(self):
    if self.step == {at}:  # SIGKILL: no cleanup, no flush, as in a crash or an OOM kill
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self)
trainer.Trainer.train_step = killed
from allformers.cli.main import main
sys.exit(main({argv!r}))
"""


def test_cli_run_killed_mid_training_resumes_to_the_same_losses(tmp_path):
    """`allformers train` SIGKILLed at step 5 (its last checkpoint at 4), then `--resume`d, logs the
    same losses as a run never interrupted; a fresh run later keeps both runs' records aside."""
    import os
    import signal
    import subprocess
    import sys

    from allformers.cli.main import main

    text = tmp_path / "play.txt"
    text.write_text("to be or not to be, that is the question. whether tis nobler in the mind to suffer " * 60)

    def argv(out, *more):
        return ["train", "--out", str(out), "--data", str(text), "--max-steps", "8", "--n-layer", "1", "--n-embd",
                "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4", "--dropout", "0.1", "--eval-iters",
                "1", "--eval-interval", "4", "--log-interval", "1", "--checkpoint-interval", "2", "--samples", "0",
                "--threads", "1", "--no-progress", "--json", *more]

    def losses(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["event"], r["step"], r.get("loss"), r.get("val_loss")) for r in rows]

    assert main(argv(tmp_path / "full")) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(__import__("pathlib").Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", KILL_AT_STEP.format(at=5, argv=argv(tmp_path / "cut"))],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert max(s for _, s, _, _ in losses(tmp_path / "cut")) == 5  # step 5 was logged, its checkpoint is step 4
    assert main(argv(tmp_path / "cut", "--resume")) == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exact, not approximate
    before = _bytes(tmp_path / "cut")
    assert main(argv(tmp_path / "cut", "--batch-size", "0")) == 2  # a failed start
    assert _bytes(tmp_path / "cut") == before
    assert main(argv(tmp_path / "cut", "--max-steps", "2")) == 0  # a fresh run
    after = _bytes(tmp_path / "cut")
    assert after["metrics.prev.jsonl"] == before["metrics.jsonl"] and after["loss.prev.png"] == before["loss.png"]
