"""`allformers zoo`: every named config with its parameter count and what sets it apart."""
import json


def register(sub):
    p = sub.add_parser("zoo", help="list every named model config")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--family", help="only this family (decoder, encoder, encoder-decoder, ...; an unknown one is "
                                    "refused with the list)")
    p.set_defaults(handler=run)


def run(args):
    from ..zoo import human, list_models

    from ..errors import InputError

    every = list_models()
    families = sorted({r["family"] for r in every})
    if args.family is not None and args.family not in families:
        raise InputError(f"unknown family {args.family!r}; use one of {', '.join(families)}")
    rows = [r for r in every if not args.family or r["family"] == args.family]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'family':<8}  {'params':>7}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['family']:<8}  {human(r['params']):>7}  {r['description']}")
    return 0
