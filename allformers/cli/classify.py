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
    p.add_argument("--output", help="write the JSON lines here instead of stdout (never the --input file)")
    p.add_argument("--batch-size", type=int, default=32, help="records per forward pass (>= 1)")
    p.add_argument("--max-length", type=int, help="tokens per record, 1 up to the model's context (default: what "
                                                  "the model was fine-tuned with, else 256)")
    p.set_defaults(handler=run)


def run(args):
    from ..errors import AllformersError, InputError
    from ..inference import classify
    from ..recipes.finetune import read_records, record_text, training_settings
    from ..training.guards import check_output_file
    from .common import load_any

    # every argument before the input is read or the model loaded, and before --output is opened
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size} must be >= 1 (records per forward pass, e.g. 32)")
    if args.max_length is not None and args.max_length < 1:
        raise InputError(f"--max-length {args.max_length} must be >= 1 (tokens per record); leave it out for the "
                         f"length the model was fine-tuned with")
    if args.output is not None:
        check_output_file(args.output, inputs=[args.input])
    records = read_records(args.input, need_label=False)
    model = load_any(args.model)
    if getattr(model.config, "task", "lm") != "sequence-classification":
        raise AllformersError(f"{args.model} is not a sequence classifier (its task is {model.config.task!r}); "
                              f"make one with `allformers finetune --model {args.model} --data FILE.jsonl`")
    if getattr(model, "tokenizer", None) is None:
        raise AllformersError(f"{args.model} has no tokenizer.json; save the classifier with its tokenizer")
    if args.max_length is not None and args.max_length > model.config.block_size:
        raise InputError(f"--max-length {args.max_length} is longer than the model's context of "
                         f"{model.config.block_size} tokens; use at most {model.config.block_size}")
    max_length = args.max_length or training_settings(args.model).get("max_length") or 256
    max_length = min(max_length, model.config.block_size)  # the default, not the user's choice, is capped
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
