"""Dialogue modes through /v1/chat/completions with the real openai client: the server answers
through the mode (tools here: a scripted turn function calls the calculator), streams the reply,
refuses what a mode cannot give, and still serves completions through the engine."""
import openai
import pytest

from allformers.dialogue.modes import MODES, dialogue_mode
from allformers.dialogue.lamda import DialogueError
from allformers.dialogue.tools import ToolCall, calculator_tool, run_with_tools
from allformers.serve import Engine, Served, create_app

from .serve_util import LiveServer, tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")


def scripted(messages):  # a model's turns: call the calculator, then read its result out
    if messages[-1]["role"] == "tool":
        return f"It is {messages[-1]['content']}."
    return ToolCall("calculator", {"expression": messages[-1]["content"].strip("?")}).text()


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_chat_model()
    modes = [Served("calc", model, tok, engine=Engine(model, tok, slots=2, max_len=256),
                    dialogue=lambda m: run_with_tools(scripted, m, [calculator_tool()]).reply),
             Served("lamda", model, tok, engine=Engine(model, tok, slots=2, max_len=256),
                    dialogue=dialogue_mode("lamda", model, tok, n=2, max_new_tokens=8))]
    with LiveServer(create_app(modes)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_chat_answers_through_the_mode(client):
    r = client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "37 * 48?"}])
    assert r.choices[0].message.content == "It is 1776." and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len("It is 1776.") and r.usage.prompt_tokens > 5  # bytes as tokens
    chunks = list(client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "2 ** 10?"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is 1024."
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_a_mode_refuses_n_and_logprobs_but_the_engine_still_serves(client):
    for extra in ({"n": 2}, {"logprobs": True}):
        with pytest.raises(openai.BadRequestError, match="dialogue mode"):
            client.chat.completions.create(model="calc", messages=[{"role": "user", "content": "1+1?"}], **extra)
    done = client.completions.create(model="calc", prompt="hello", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens == 4  # completions go to the batching engine as before


def test_the_lamda_mode_replies_with_a_ranked_candidate(client):
    r = client.chat.completions.create(model="lamda", messages=[{"role": "user", "content": "hi"}])
    assert isinstance(r.choices[0].message.content, str)


def test_modes_are_named_and_sparrow_needs_its_parts():
    model, tok = tiny_chat_model(block_size=1024)  # the tools' system prompt is ~450 bytes
    assert MODES == ("tools", "lamda", "sparrow")
    with pytest.raises(DialogueError, match="needs a passage index and a reward model"):
        dialogue_mode("sparrow", model, tok)
    with pytest.raises(DialogueError, match="unknown dialogue mode"):
        dialogue_mode("koala", model, tok)
    reply = dialogue_mode("tools", model, tok, max_new_tokens=4)([{"role": "user", "content": "hi"}])
    assert isinstance(reply, str)


def test_serve_cli_wires_the_mode(tmp_path, capsys):
    from types import SimpleNamespace

    from allformers.cli.main import main
    from allformers.cli.serve import load_served
    from allformers.dialogue.sparrow import RewardHead

    # sparrow without its reward model: a one-line error before anything is indexed, exit code 2
    assert main(["serve", "smollm2-135m", "--override", "n_layer=1", "--override", "n_embd=32", "--override",
                 "n_head=2", "--override", "n_kv_head=1", "--override", "intermediate_size=32",
                 "--dialogue", "sparrow"]) == 2
    assert "--dialogue sparrow needs --reward DIR" in capsys.readouterr().err
    args = SimpleNamespace(seed=0, device="cpu", dtype="float32", slots=1, max_len=128, max_queue=1, prefill_chunk=8,
                           dialogue="tools", corpus_addresses=None, reward=None)
    over = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "intermediate_size": 32}
    served = load_served("smollm2-135m", args=args, overrides=over)
    assert callable(served.dialogue) and served.engine is not None
    assert load_served("smollm2-135m", args=SimpleNamespace(**{**vars(args), "dialogue": None}),
                       overrides=over).dialogue is None
    head = RewardHead(32)  # a saved reward head loads as sparrow's scorer
    from allformers.dialogue.modes import load_scorer

    scorer = load_scorer(head.save(tmp_path / "rm"), served.model, served.tokenizer)
    assert scorer([[{"role": "user", "content": "hi"}]], ["yes"]).shape == (1,)
    with pytest.raises(DialogueError, match="neither a reward head"):
        load_scorer(tmp_path, served.model, served.tokenizer)
