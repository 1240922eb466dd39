"""`allformers ppo --model smollm2 --reward RM_DIR --prompts FILE --out DIR`: PPO against a reward
model with a KL penalty to the starting policy; the merged policy is saved into DIR."""
import json

from ..training.rlhf import PPOConfig
from .common import add_run_args
from .rlhf import add_lora_args, lora_from


def register(sub):
    p = sub.add_parser("ppo", help="PPO against a reward model (KL-penalised); saves the merged policy")
    p.add_argument("--model", default="smollm2", help="the policy to start from (folder, .gguf or 'smollm2')")
    p.add_argument("--reward", required=True, help="reward model folder (from `allformers reward`)")
    p.add_argument("--prompts", required=True, help='text file (one prompt a line) or JSON lines with "prompt"')
    p.add_argument("--out", required=True, help="folder for the policy (allformers format), metrics, plot")
    p.add_argument("--iterations", type=int, default=PPOConfig.iterations, help="rollout phases")
    p.add_argument("--rollout-batch", type=int, default=PPOConfig.rollout_batch, help="replies sampled per phase")
    p.add_argument("--minibatch", type=int, default=PPOConfig.minibatch, help="replies per optimizer step")
    p.add_argument("--epochs", type=int, default=PPOConfig.epochs, help="passes over each phase's replies")
    p.add_argument("--max-new-tokens", type=int, default=PPOConfig.max_new_tokens)
    p.add_argument("--kl-coef", type=float, default=PPOConfig.kl_coef)
    p.add_argument("--lr", type=float, default=PPOConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    add_lora_args(p)
    add_run_args(p)
    p.set_defaults(handler=run)


def read_prompts(path) -> list[str]:
    from pathlib import Path

    from ..errors import AllformersError
    from ..training.data import read_jsonl

    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        prompts = [r.get("prompt") or r.get("instruction") for _, r in read_jsonl(path)]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise AllformersError(f"{path}: expected one prompt a line, or JSON lines with a 'prompt' field")
    return prompts


def run(args):
    from .. import load
    from ..checkpoints import save
    from ..models.lora import merge_lora
    from ..training.rlhf import encode_prompt, rm_score_fn, train_ppo
    from .common import load_model

    lm = load_model(args.model)
    rm = load(args.reward)
    prompts = [encode_prompt(lm.tokenizer, p) for p in read_prompts(args.prompts)]
    cfg = PPOConfig(iterations=args.iterations, rollout_batch=args.rollout_batch, minibatch=args.minibatch,
                    epochs=args.epochs, max_new_tokens=args.max_new_tokens, kl_coef=args.kl_coef, lr=args.lr,
                    lora=lora_from(args), seed=args.seed)
    fit = train_ppo(lm, lm.tokenizer, rm_score_fn(rm, lm.tokenizer), prompts, cfg, out=args.out,
                    progress=not args.no_progress, threads=args.threads)
    save(merge_lora(lm), args.out, tokenizer=lm.tokenizer)
    fit.pop("history")
    if args.json:
        print(json.dumps(fit, indent=2))
    else:
        r = fit["last_rollout"]
        print(f"ppo: {fit['step']} steps in {fit['train_time_s']:.0f} s; last rollouts: reward {r['score']:.3f}, "
              f"KL {r['kl']:.2f} nats/reply, {r['reply_tokens']:.1f} tokens/reply")
        print(f"saved to {args.out} (allformers chat {args.out}); metrics: {fit['metrics']}")
    return 0
