"""Server-side dialogue modes: `allformers serve MODEL --dialogue tools|lamda|sparrow` answers
/v1/chat/completions through a dialogue system instead of plain generation.

    reply = dialogue_mode("tools", model, tokenizer)(messages)   # what the server calls per request

  * tools: the tool loop (tools.py) with the calculator, and a search over `index` when one is given;
    the reply is the model's answer after the tools' results came back;
  * lamda: n sampled candidates, the best by LaMDA's SSI heads (trained at start-up on
    data.ssi_examples: seconds);
  * sparrow: candidates with and without retrieved evidence reranked by `scorer` (a RewardHead or a
    full reward model); the reply cites the passage it used.
A mode runs under the model's lock, beside (not inside) the batching engine: one request at a time."""
from __future__ import annotations

from typing import Callable, Optional

from .lamda import DialogueError, Responder

MODES = ("tools", "lamda", "sparrow")


def dialogue_mode(mode: str, model, tokenizer, *, index=None, scorer: Optional[Callable] = None, n: int = 4,
                  max_new_tokens: int = 128, seed: int = 0) -> Callable[[list], str]:
    """messages -> reply for one of MODES."""
    responder = Responder(model, tokenizer, max_new_tokens=max_new_tokens, seed=seed)
    if mode == "tools":
        from .tools import calculator_tool, run_with_tools, search_tool

        tools = [calculator_tool()] + ([search_tool(index)] if index is not None else [])
        return lambda messages: run_with_tools(responder.tool_turn, messages, tools).reply
    if mode == "lamda":
        from .data import ssi_examples
        from .lamda import SSIHeads, lamda_reply

        heads = SSIHeads.train_on(model, tokenizer, ssi_examples())
        return lambda messages: lamda_reply(responder, heads, messages, n=n)[0]
    if mode == "sparrow":
        from .sparrow import sparrow_reply

        if index is None or scorer is None:
            raise DialogueError("the sparrow mode needs a passage index and a reward model (serve: --reward DIR "
                                "with a RewardHead or a reward model folder)")
        return lambda messages: sparrow_reply(responder, index, scorer, messages)[0].text
    raise DialogueError(f"unknown dialogue mode {mode!r}; use one of {', '.join(MODES)}")


def load_scorer(path, model, tokenizer) -> Callable:
    """A Sparrow scorer from a folder: a RewardHead (reward_head.json, read on `model`'s features)
    or a full reward model (`allformers reward` output)."""
    from pathlib import Path

    from .sparrow import RewardHead, reward_model_scorer

    path = Path(path)
    if (path / "reward_head.json").is_file():
        return RewardHead.load(path).scorer(model, tokenizer)
    if (path / "config.json").is_file():
        from ..checkpoints import load

        rm = load(path).eval()
        return reward_model_scorer(rm, getattr(rm, "tokenizer", None) or tokenizer)
    raise DialogueError(f"{path} holds neither a reward head (reward_head.json) nor a reward model (config.json)")
