"""`allformers classify MODEL_DIR --input FILE.jsonl [--output FILE]`: one JSON line per record
with the predicted label, its probability and every class's probability (and the record's id)."""
import json
import sys


def register(sub):
    p = sub.add_parser("classify", help="classify the records of a JSON-lines file with a fine-tuned classifier")
    p.add_argument("model", help="a classifier folder (from `allformers finetune`, or a Hugging Face "
                                 "*ForSequenceClassification folder)")
    p.add_argument("--input", required=True, help="JSON-lines file: one object a line with 'text' (and optionally "
                                                  "'subject', 'id', 'label')")
    p.add_argument("--output", help="write the JSON lines here instead of stdout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="tokens per record (default: what the model was fine-tuned with, "
                                                  "else 256)")
    p.set_defaults(handler=run)


def run(args):
    from ..errors import AllformersError
    from ..inference import classify
    from ..recipes.finetune import read_records, record_text, training_settings
    from .common import load_any

    records = read_records(args.input, need_label=False)  # errors before the (slower) model load
    model = load_any(args.model)
    if getattr(model.config, "task", "lm") != "sequence-classification":
        raise AllformersError(f"{args.model} is not a sequence classifier (its task is {model.config.task!r}); "
                              f"make one with `allformers finetune --model {args.model} --data FILE.jsonl`")
    if getattr(model, "tokenizer", None) is None:
        raise AllformersError(f"{args.model} has no tokenizer.json; save the classifier with its tokenizer")
    max_length = args.max_length or training_settings(args.model).get("max_length") or 256
    max_length = min(max_length, model.config.block_size)
    names = model.config.labels or [str(i) for i in range(model.config.num_labels)]
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    correct = labelled = 0
    try:
        for i in range(0, len(records), args.batch_size):
            chunk = records[i:i + args.batch_size]
            labels, probs = classify(model, [record_text(r) for r in chunk], batch_size=args.batch_size,
                                     max_length=max_length)
            for rec, label, p in zip(chunk, labels, probs.tolist()):
                row = {"id": rec["id"]} if "id" in rec else {"line": rec["_line"]}
                row.update(label=label, probability=round(max(p), 6),
                           probabilities={n: round(v, 6) for n, v in zip(names, p)})
                if rec.get("label") is not None and str(rec["label"]) in names:
                    labelled += 1
                    correct += str(rec["label"]) == label
                out.write(json.dumps(row) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if labelled:
        print(f"[allformers] accuracy {correct / labelled:.4f} on the {labelled} records that carry a known label",
              file=sys.stderr)
    return 0
