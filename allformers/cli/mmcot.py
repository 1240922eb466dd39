"""`allformers mmcot train|eval|ask`: Multimodal-CoT (details in allformers/recipes/mmcot.py; `mmcot train`
takes the settings of an MMCoTRecipe, one flag per field: `allformers train --recipe mmcot-synthetic-t5-vit`).

    allformers mmcot train --data synthetic --n-train 5000 --out runs/mmcot          # T5 + ViT, two stages
    allformers mmcot train --data ../shared/data/scienceqa_subset --eval-split val --out runs/sqa
    allformers mmcot train --data ../shared/data/scienceqa_subset --variant decoder --base smollm2 --lora-rank 8 ...
    allformers mmcot eval --model runs/mmcot --split test
    allformers mmcot ask --model runs/mmcot --image x.png --question "Will these magnets attract or repel each other?" \\
        --choices attract repel --context "In the picture, north poles are red and south poles are blue."
"""
import json

def register(sub):
    p = sub.add_parser("mmcot", help="Multimodal-CoT: train / evaluate / ask a vision-fused model (two stages)",
                       description="Multimodal chain-of-thought on ScienceQA-format data or the synthetic science set: "
                                   "stage 1 writes a rationale, stage 2 answers from it.")
    cmds = p.add_subparsers(dest="mmcot_command", required=True, metavar="{train,eval,ask}")

    t = cmds.add_parser("train", help="train both stages (or a one-stage baseline), evaluate, save")
    _data_args(t)
    t.add_argument("--out", required=True, help="folder for the rationale and answer models and mmcot.json")
    m = t.add_argument_group("model")
    m.add_argument("--variant", default="t5", choices=("t5", "decoder"),
                   help="t5: T5 with gated fusion after the encoder; decoder: PaLM-E style (image tokens in the input)")
    m.add_argument("--vision", default="vit", choices=("vit", "detr", "features", "none"), help="image encoder (none: text only; features: "
                   "precomputed --features)")
    m.add_argument("--base", help="decoder variant: a pretrained LM to start from (e.g. smollm2); default: from scratch")
    m.add_argument("--lora-rank", type=int, default=8, help="with --base: LoRA rank (0: train only the image projection)")
    m.add_argument("--lora-layers", type=int, default=None, help="with --base: adapt only the top N blocks")
    m.add_argument("--d-model", type=int, help="from-scratch width (default 64)")
    m.add_argument("--layers", type=int, help="from-scratch layers (T5: per stack)")
    m.add_argument("--vocab-size", type=int, default=2048, help="BPE size for from-scratch models")
    m.add_argument("--dropout", type=float, default=0.0)
    s = t.add_argument_group("pipeline and training")
    s.add_argument("--one-stage", action="store_true", help="a one-stage baseline instead of the two-stage pipeline")
    s.add_argument("--format", default="QCM-A", choices=("QCM-A", "QCM-ALE"), help="the one-stage format")
    s.add_argument("--stage2-init", default="base", choices=("base", "stage1"),
                   help="base: stage 2 starts from the weights stage 1 started from (the reference); stage1: from the "
                        "trained stage-1 model")
    s.add_argument("--rationale-steps", type=int, default=3000, help="stage 1 steps")
    s.add_argument("--answer-steps", type=int, default=800, help="stage 2 (or one-stage) steps")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3 from scratch, 2e-4 with --base)")
    s.add_argument("--train-split", default="train")
    s.add_argument("--max-source", type=int, default=320, help="source tokens (longer sources are cut at the end)")
    s.add_argument("--max-target", type=int, default=160, help="target tokens in training (rationales are cut)")
    s.add_argument("--max-rationale-tokens", type=int, default=96, help="tokens stage 1 may generate")
    s.add_argument("--max-train", type=int, help="use only the first N training questions")
    t.set_defaults(handler=run_train)

    e = cmds.add_parser("eval", help="evaluate a trained pipeline and print the paper's table")
    e.add_argument("--model", required=True, help="folder written by `mmcot train`")
    _data_args(e, default=None)
    e.set_defaults(handler=run_eval)

    a = cmds.add_parser("ask", help="one question (and picture): print the rationale and the answer")
    a.add_argument("--model", required=True, help="folder written by `mmcot train`")
    a.add_argument("--image", help="picture file (png, jpg, ...)")
    a.add_argument("--question", required=True)
    a.add_argument("--choices", nargs="+", required=True)
    a.add_argument("--context", default="", help="text context (ScienceQA's hint)")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--json", action="store_true")
    a.set_defaults(handler=run_ask)


def _data_args(p, default="synthetic"):
    d = p.add_argument_group("data")
    d.add_argument("--data", default=default, help="'synthetic' (generated) or a ScienceQA-format folder "
                   "(problems.json, captions.json, pid_splits.json, optional images/<qid>/image.png)"
                   + ("" if default else "; default: what the model was trained on"))
    d.add_argument("--n-train", type=int, default=5000, help="synthetic: training problems")
    d.add_argument("--n-val", type=int, default=500)
    d.add_argument("--n-test", type=int, default=500)
    d.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    d.add_argument("--image-size", type=int, default=32, help="pictures are resized to this (0: do not read images/)")
    d.add_argument("--no-caption", action="store_true", help="do not add captions.json to the context")
    d.add_argument("--features", help="precomputed image features (.npy, (images, patches, dim))")
    d.add_argument("--name-map", help="question id -> feature row (JSON); default name_map.json beside --features")
    d.add_argument("--feature-kind", choices=("detr", "vit", "clip"), help="check the features' shape against this kind")
    d.add_argument("--eval-split", "--split", dest="eval_split", default="test" if default else None,
                   help="split to evaluate (ScienceQA subset: val)")
    d.add_argument("--max-eval", type=int, help="evaluate only the first N questions")
    d.add_argument("--eval-batch-size", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits tiny models on shared cores)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--json", action="store_true", help="print the scores as JSON")


def _report(result, args, table: str):
    from ..recipes.mmcot import result_json

    print(json.dumps(result_json(result), indent=2) if args.json else table)


def run_train(args):
    import dataclasses

    from ..recipes.mmcot import MMCoTRecipe

    names = {f.name for f in dataclasses.fields(MMCoTRecipe)} - {"name", "description", "target"}
    recipe = MMCoTRecipe(name="mmcot", **{k: getattr(args, k) for k in names if hasattr(args, k)})
    result = recipe.run(out=args.out, progress=not args.no_progress)
    if args.json:
        print(json.dumps({k: result[k] for k in ("scores", "rouge_l", "gate", "seconds")}, indent=2))
    else:
        print(result["table"])
    return 0


def run_eval(args):
    import torch

    from ..recipes.mmcot import evaluate_pipeline, load_data, load_pipeline, pipeline_config, report_table, split_qids

    torch.set_num_threads(args.threads)
    rationale, answer, meta = load_pipeline(args.model)
    data = load_data(args, tokenizer=answer.tokenizer, chat=meta.get("chat", False), data_source=meta.get("data"))
    data.max_source, data.max_target = meta["max_source"], meta["max_target"]
    split = args.eval_split or meta.get("eval_split") or "test"
    qids = split_qids(data, split, args.max_eval)
    cfg = pipeline_config(meta, eval_batch_size=args.eval_batch_size)
    result = evaluate_pipeline(rationale, answer, data, qids, cfg, progress=not args.no_progress)
    _report(result, args, report_table(result, f"{args.model} ({split})", paper=data.source["kind"] != "synthetic",
                                       data=data, qids=qids))
    return 0


def run_ask(args):
    import torch

    from ..recipes.mmcot import ask, load_pipeline

    torch.set_num_threads(args.threads)
    rationale, answer, meta = load_pipeline(args.model)
    out = ask(rationale, answer, meta, args.question, args.choices, image=args.image, context=args.context)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if out["rationale"] is not None:
        print(f"Rationale: {out['rationale']}")
    print(f"Answer: {out['answer']}")
    print(f"Choice: {out['choice_text']}" if out["choice"] is not None else "Choice: (the answer did not parse)")
    return 0
