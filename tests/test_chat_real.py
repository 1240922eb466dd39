"""End to end on a real model: SmolLM2-135M-Instruct (GGUF, Q4_1) answers a factual question."""
import pytest
import torch

import allformers


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    from allformers.generation import generate
    from allformers.zoo.assets import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except allformers.AllformersError as e:
        pytest.skip(str(e))
    model = allformers.load(path)
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    input_ids = torch.tensor([tok.encode(prompt)])  # (1, T)
    out = generate(model, input_ids, max_new_tokens=40, temperature=0.0, eos_id=tok.eos_id)  # (1, T + new)
    assert out.shape[0] == 1 and torch.equal(out[0, : input_ids.shape[1]], input_ids[0])
    reply = tok.decode(out[0, input_ids.shape[1]:].tolist())
    assert "Paris" in reply, reply
