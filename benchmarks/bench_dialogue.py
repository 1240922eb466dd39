"""The dialogue systems on the real SmolLM2-135M-Instruct, on a CPU.

    python benchmarks/bench_dialogue.py             # both parts (~25-30 min on 2 cores)
    python benchmarks/bench_dialogue.py --quick     # a smoke run of every stage (~5 min)

(a) Tools (LaMDA's toolset): SmolLM2 is trained with LoRA on a small generated tool-use set (two SFT
    records per word problem: the turn that calls the calculator, and the answer after its result),
    then answers held-out arithmetic questions through the tool loop. Scored by exact answer (the
    reply's last number equals the calculator's), against the same base model answering alone, and
    against the base model offered the tool without training.
(b) Sparrow: questions quoting a sentence of a State of the Union address ("which president / which
    year said this?", answer checked by whole-word match) over a MiniLM index of --addresses
    addresses. Plain generation answers alone; Sparrow retrieves the top-k passages, writes a
    greedy candidate from each and plain candidates without evidence, and a reward model picks one.
    The reward model is a learned scalar head on the frozen SmolLM2's reply features (RewardHead,
    Bradley-Terry) trained on pairs from the *training* questions, labelled by whether the
    candidate holds the answer; no hand-written rule scores anything. The reply's accuracy is
    judged on its text alone, without the citation appended to it (reported separately).
Prints one JSON object last."""
import argparse
import copy
import json
import os
import sys
import time

import torch


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def batched(items, n):
    for s in range(0, len(items), n):
        yield items[s:s + n]


# ---------------------------------------------------------------------- (a) the calculator
def bench_tools(base, tok, args) -> dict:
    from allformers.dialogue.data import arithmetic_questions, last_number, tool_use_records
    from allformers.dialogue.lamda import Responder
    from allformers.dialogue.tools import calculator_tool, run_with_tools_batch
    from allformers.models.lora import LoRAConfig
    from allformers.recipes.sft import run_sft

    train = arithmetic_questions(args.tool_train, seed=args.seed)
    test = arithmetic_questions(args.tool_test, seed=args.seed + 1, exclude={q.question for q in train})
    out = {"train_questions": len(train), "test_questions": len(test)}

    def score(replies, questions=test):
        return sum(last_number(r) == q.answer for r, q in zip(replies, questions)) / len(questions)

    t = time.perf_counter()
    plain = Responder(base, tok, max_new_tokens=48)
    alone = [r for b in batched(test, args.batch) for r in plain.batch([[{"role": "user", "content": q.question}]
                                                                         for q in b])]
    out["accuracy_without_tool"] = score(alone)
    log(f"[tools] base model alone: {out['accuracy_without_tool']:.3f} ({time.perf_counter() - t:.0f} s)")

    def with_tool(model, name, questions=test):
        t = time.perf_counter()
        r = Responder(model, tok, max_new_tokens=48)
        turns = [turn for b in batched(questions, args.batch) for turn in
                 run_with_tools_batch(r.tool_turns, [[{"role": "user", "content": q.question}] for q in b],
                                      [calculator_tool()], max_calls=2)]
        acc = score([turn.reply for turn in turns], questions)
        called = sum(bool(turn.calls) for turn in turns) / len(turns)
        right_call = sum(bool(turn.calls) and turn.calls[0][1] == q.answer
                         for turn, q in zip(turns, questions)) / len(questions)
        log(f"[tools] {name}: accuracy {acc:.3f}, called the tool {called:.3f}, right result {right_call:.3f} "
            f"({time.perf_counter() - t:.0f} s); e.g. {turns[0].messages[-3:]}")
        return acc, called, right_call, turns

    offered = test[:args.offered_test]  # a control: does the untrained model use the tool it is offered?
    acc, called, _, _ = with_tool(base, "base model offered the tool", offered)
    out["accuracy_base_offered_tool"], out["base_tool_call_rate"], out["offered_questions"] = acc, called, len(offered)

    tuned = copy.deepcopy(base)
    tuned.tokenizer = tok
    lora = LoRAConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, top_layers=args.lora_layers)
    sft = run_sft(tuned, tool_use_records(train), template="chatml", tokenizer=tok, lora=lora, merge=True,
                  max_steps=args.tool_steps, batch_size=args.tool_batch, lr=args.tool_lr, eval_fraction=0.05,
                  max_length=320, threads=args.threads, progress=not args.no_progress, verbose=True)
    out["sft"] = {k: sft[k] for k in ("heldout_loss_before", "heldout_loss_after", "first_train_loss",
                                      "final_train_loss", "trainable_params")}
    out["sft"]["train_s"] = sft["times_s"]["train"]
    out["sft"]["steps"], out["sft"]["batch_size"], out["sft"]["lora"] = args.tool_steps, args.tool_batch, sft["lora"]
    acc, called, right, turns = with_tool(sft["trained_model"], "LoRA-tuned model with the calculator")
    out.update(accuracy_with_tool=acc, tool_call_rate=called, tool_result_right=right)
    out["examples"] = [{"question": q.question, "answer": q.answer, "reply": t.reply,
                        "calls": [(c.arguments, r) for c, r in t.calls]} for q, t in list(zip(test, turns))[:3]]
    return out


# ---------------------------------------------------------------------- (b) Sparrow
def bench_sparrow(base, tok, args) -> dict:
    import allformers
    from allformers.dialogue.data import answers, sotu_questions
    from allformers.dialogue.lamda import Responder
    from allformers.dialogue.retrieval import PassageIndex, sotu_addresses, sotu_passages
    from allformers.dialogue.sparrow import RewardHead, scorer_features, sparrow_candidates
    from allformers.zoo.assets import minilm_path

    n_addr = len(sotu_addresses())
    chosen = sorted({round(i * (n_addr - 1) / max(1, args.addresses - 1)) for i in range(args.addresses)})
    passages = sotu_passages(addresses=chosen)
    t = time.perf_counter()
    index = PassageIndex.build(passages, allformers.load(minilm_path()).eval(), name="the State of the Union",
                               progress=not args.no_progress)
    out = {"addresses": len(chosen), "passages": len(passages), "index_s": round(time.perf_counter() - t, 1)}
    log(f"[sparrow] {len(passages)} passages of {len(chosen)} addresses indexed in {out['index_s']} s")
    train = sotu_questions(passages, args.sparrow_train, seed=args.seed)
    test = sotu_questions(passages, args.sparrow_test, seed=args.seed + 1, exclude={q.quote for q in train})
    out.update(train_questions=len(train), test_questions=len(test))
    ask = lambda q: [{"role": "user", "content": q.question}]  # noqa: E731

    t = time.perf_counter()
    plain = Responder(base, tok, max_new_tokens=args.reply_tokens)
    replies = [r for b in batched(test, args.batch) for r in plain.batch([ask(q) for q in b])]
    out["accuracy_plain"] = sum(answers(r, q.answer) for r, q in zip(replies, test)) / len(test)
    log(f"[sparrow] plain generation: {out['accuracy_plain']:.3f} ({time.perf_counter() - t:.0f} s)")

    kw = dict(k=args.k, n_evidence=1, n_plain=args.n_plain, temperature=0.7, max_new_tokens=args.reply_tokens)

    def candidates(questions):
        return [sparrow_candidates(plain, index, ask(q), **kw) for q in questions]

    t = time.perf_counter()
    train_c = candidates(train)
    pairs = []
    for q, cs in zip(train, train_c):
        good = [c for c in cs if answers(c.reply, q.answer)]
        bad = [c for c in cs if not answers(c.reply, q.answer)]
        pairs += [((g.conversation, g.reply), (b.conversation, b.reply)) for g in good for b in bad]
    log(f"[sparrow] {len(pairs)} reward pairs from {len(train)} training questions ({time.perf_counter() - t:.0f} s)")
    if not pairs:
        raise SystemExit("no training question had both a right and a wrong candidate: raise --sparrow-train")
    chosen = scorer_features(base, tok, [g for g, _ in pairs])  # (P, C): each side read in its own context
    rejected = scorer_features(base, tok, [b for _, b in pairs])
    head = RewardHead.fit(chosen, rejected)
    head.reads = (base, tok)
    if args.save_reward:  # for `allformers serve smollm2 --dialogue sparrow --reward DIR`
        out["reward_head"] = str(head.save(args.save_reward))
    with torch.no_grad():
        train_acc = float((head(chosen) > head(rejected)).float().mean())
    out.update(reward_pairs=len(pairs), reward_train_pair_accuracy=train_acc)

    t = time.perf_counter()
    test_c = candidates(test)
    score = head.scorer()
    best, cited, top1, oracle, retrieved, used_evidence = [], [], [], [], [], []
    for q, cs in zip(test, test_c):
        rewards = score([c.conversation for c in cs], [c.reply for c in cs])
        b = cs[int(rewards.argmax())]
        best.append(answers(b.reply, q.answer))
        cited.append(answers(b.text, q.answer))
        used_evidence.append(b.evidence is not None)
        top1.append(answers(cs[0].reply, q.answer))  # the top passage's greedy reply, no reranking
        oracle.append(any(answers(c.reply, q.answer) for c in cs))
        retrieved.append(any(c.evidence is not None and q.quote in c.evidence.text for c in cs))
    n = len(test)
    out.update(accuracy_sparrow=sum(best) / n, accuracy_sparrow_with_citation=sum(cited) / n,
               accuracy_top1_evidence_no_rerank=sum(top1) / n, accuracy_oracle_candidate=sum(oracle) / n,
               retrieval_recall_at_k=sum(retrieved) / n, chose_evidence_candidate=sum(used_evidence) / n,
               k=args.k, n_plain=args.n_plain)
    log(f"[sparrow] retrieval + reranking: {out['accuracy_sparrow']:.3f} (with its citation "
        f"{out['accuracy_sparrow_with_citation']:.3f}; top passage without reranking {out['accuracy_top1_evidence_no_rerank']:.3f}; "
        f"oracle {out['accuracy_oracle_candidate']:.3f}; recall@{args.k} {out['retrieval_recall_at_k']:.3f}) "
        f"({time.perf_counter() - t:.0f} s)")
    q, cs = test[0], test_c[0]
    rewards = score([c.conversation for c in cs], [c.reply for c in cs])
    out["example"] = {"question": q.question, "answer": q.answer, "reply": cs[int(rewards.argmax())].text,
                      "plain_reply": replies[0]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings: every stage runs in a few minutes")
    p.add_argument("--only", choices=("tools", "sparrow"), help="run one part")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="conversations generated as one batch")
    p.add_argument("--tool-train", type=int, default=120, help="training word problems (2 SFT records each)")
    p.add_argument("--tool-test", type=int, default=40)
    p.add_argument("--offered-test", type=int, default=16, help="of those, asked of the untrained model with the tool")
    p.add_argument("--tool-steps", type=int, default=40)
    p.add_argument("--tool-batch", type=int, default=4)
    p.add_argument("--tool-lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-layers", type=int, default=15, help="adapt only the top N of the 30 blocks (the backward "
                                                               "pass stops there: ~40%% less work a step)")
    p.add_argument("--addresses", type=int, default=8, help="State of the Union addresses indexed (of 233)")
    p.add_argument("--sparrow-train", type=int, default=24)
    p.add_argument("--sparrow-test", type=int, default=32)
    p.add_argument("--k", type=int, default=2, help="passages retrieved (one evidence candidate each)")
    p.add_argument("--n-plain", type=int, default=1, help="candidates without evidence")
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--save-reward", metavar="DIR", help="save the trained reward head there (the server's sparrow mode)")
    p.add_argument("--no-progress", action="store_true")
    if p.parse_known_args(argv)[0].quick:  # smaller defaults; flags given still win
        p.set_defaults(tool_train=24, tool_test=16, tool_steps=6, offered_test=8, addresses=3, sparrow_train=8,
                       sparrow_test=8)
    args = p.parse_args(argv)

    import allformers
    from allformers.zoo.assets import smollm2_gguf_path

    t0, c0 = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load = os.getloadavg()[0]
    base = allformers.load(smollm2_gguf_path()).eval()
    tok = base.tokenizer
    result = {"model": "SmolLM2-135M-Instruct", "quick": args.quick, "threads": args.threads,
              "load_average_at_start": round(load, 2)}
    if args.only in (None, "tools"):
        result["tools"] = bench_tools(base, tok, args)
        result["tools"]["target_with_tool"] = 0.9
        result["tools"]["met_target"] = result["tools"]["accuracy_with_tool"] >= 0.9
    if args.only in (None, "sparrow"):
        result["sparrow"] = bench_sparrow(base, tok, args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["cpu_s"] = round(time.process_time() - c0, 1)  # the work itself, whatever else shares the machine
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
