"""Training objectives. Each one is a callable `objective(model, batch) -> scalar loss`, so
the one Trainer serves them all (causal LM today; MLM, seq2seq, reward models, PPO later).

An objective may also define `num_tokens(batch) -> int` (tokens/s and MFU count these);
without it the Trainer counts the elements of the batch's first tensor."""
from .causal_lm import IGNORE_INDEX, CausalLM, causal_lm_loss

__all__ = ["CausalLM", "causal_lm_loss", "IGNORE_INDEX"]
