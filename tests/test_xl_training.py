"""Transformer-XL and XLNet through the shared Trainer: segment recurrence (memory carried from batch to
batch) and permutation language modelling both lower the loss on a learnable stream."""
import pytest
import torch

from allformers import Config
from allformers.models import build_model
from allformers.objectives.permutation_lm import PermutationLM, PermutationLMData
from allformers.objectives.segment_lm import SegmentLM, SegmentStream
from allformers.training import RandomWindows, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
V = 16


def corpus(n=4000, seed=0):
    """next = (3 * prev + 1) % V most of the time, 20% random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, dtype=torch.long)
    noise, flip = torch.randint(V, (n,), generator=g), torch.rand(n, generator=g) < 0.2
    for i in range(1, n):
        out[i] = noise[i] if flip[i] else (3 * out[i - 1] + 1) % V
    return out


def tiny(causal, **kw):
    torch.manual_seed(0)
    return build_model(Config(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32, causal=causal,
                              position="relative_xl", attention_class="RelativeXLAttention", norm_placement="post",
                              attn_bias=False, **kw))


def _settings(**kw):
    return TrainConfig(**{**dict(max_steps=40, batch_size=4, warmup_steps=4, lr=3e-3, min_lr=3e-4, log_interval=1,
                                 eval_interval=0, eval_at_start=True, checkpoint=False), **kw})


def test_segment_recurrence_trains_and_carries_memory_between_batches():
    data = corpus()
    model = tiny(True, mem_len=8)
    stream = SegmentStream(data[:3000], batch_size=4, seg_len=8)
    objective = SegmentLM()
    trainer = Trainer(model, objective, stream, _settings(),
                      eval_data={"val": SegmentStream(data[3000:], batch_size=4, seg_len=8).batches()[:8]},
                      progress=False)
    start = trainer.evaluate()["val"]
    trainer.fit()
    assert trainer.last_eval["val"] < start - 0.3
    memory = objective.memory[True]  # the training memory: the last segment's states, detached
    assert memory.length == 8 and all(not m.requires_grad for m in memory.layers)
    assert stream.pos == 40 * 8  # every batch continued the rows where the previous one stopped


def test_segment_stream_rows_continue_and_wrap_with_a_reset():
    stream = SegmentStream(torch.arange(101), batch_size=2, seg_len=10)  # rows: 0..49 and 50..99
    a, b = stream.sample(2), stream.sample(2)
    assert a["reset"] and not b["reset"]
    assert a["x"][:, -1].tolist() == [9, 59] and b["x"][:, 0].tolist() == [10, 60] and b["y"][0, 0] == 11
    for _ in range(3):
        stream.sample(2)
    assert stream.sample(2)["reset"]  # 5 segments of 10 per row, then back to the start
    with pytest.raises(Exception, match="batch size is fixed"):
        stream.sample(3)


def test_permutation_lm_trains_through_the_trainer():
    data = corpus()
    model = tiny(False, relative_segments=True)
    train = PermutationLMData(RandomWindows(data[:3000], 16, seed=0), num_predict=4, seed=1)
    val = PermutationLMData(RandomWindows(data[3000:], 16, seed=5), num_predict=4, seed=6)
    trainer = Trainer(model, PermutationLM(), train, _settings(max_steps=60, lr=1e-2, batch_size=8),
                      eval_data={"val": [val.sample(8) for _ in range(4)]}, progress=False)
    start = trainer.evaluate()["val"]
    trainer.fit()
    assert trainer.last_eval["val"] < start - 0.3
