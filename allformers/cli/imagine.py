"""`allformers imagine "caption" [...] --model DIR|NAME --steps N --guidance G -o out.png`: pictures
from captions with a trained text-to-image model (DALL-E, GLIDE, latent diffusion or Imagen, as the
text-to-image recipes save them). One caption and one sample: the picture; several captions (or
--samples K): a grid with the captions above their columns. A progress bar runs over the denoising
steps (the image tokens, for DALL-E).

NAME is a text-to-image recipe (glide-shapes, dalle-shapes, ldm-shapes, imagen-shapes): its model is
read from runs/NAME, where `allformers train --recipe NAME` puts it; --train trains it there first
(`--quick` for a smoke run)."""
from __future__ import annotations

import sys
from pathlib import Path


def register(sub):
    p = sub.add_parser("imagine", help="draw pictures from captions with a text-to-image model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("captions", nargs="*", help="one or more captions (e.g. 'a red circle above a blue square')")
    p.add_argument("--model", help="a saved text-to-image folder, or a recipe name (see --list)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (DDIM)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="diffusion: rescale the guided prediction to the conditional one's scale, 0..1 (0.7: "
                        "Lin et al.; against the washed-out or saturated pictures of a large --guidance)")
    p.add_argument("--samples", type=int, default=1, help="pictures per caption (rows of the grid)")
    p.add_argument("--grid", action="store_true", help="write a grid even for one caption and one sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="DALL-E: sampling temperature of the image codes")
    p.add_argument("--top-k", type=int, default=32, help="DALL-E: keep the k most likely codes")
    p.add_argument("--no-super-res", action="store_true", help="Imagen: stop at the base resolution")
    p.add_argument("--scale", type=int, default=8, help="a single picture is enlarged this many times (nearest)")
    p.add_argument("-o", "--out", default="imagine.png", help="output PNG")
    p.add_argument("--train", action="store_true", help="train the recipe NAME into runs/NAME first")
    p.add_argument("--quick", action="store_true", help="with --train: the recipe's smoke-sized settings")
    p.add_argument("--list", action="store_true", help="list the text-to-image recipes and exit")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def resolve(model: str, train: bool, quick: bool, progress: bool) -> Path:
    """A folder as given, or the folder of a recipe (trained there first with --train)."""
    from ..errors import AllformersError
    from ..recipes import get_recipe
    from ..recipes.text_to_image import T2I_RECIPES, default_out, run_t2i

    path = Path(model)
    if model in T2I_RECIPES:
        path = default_out(model)
        if train:
            recipe = get_recipe(model)
            run_t2i(recipe.replace(quick=True) if quick else recipe, out=path, progress=progress,
                    log=lambda msg: print(f"[allformers] {msg}", file=sys.stderr))
        elif not (path / "config.json").exists():
            raise AllformersError(f"{path} holds no trained {model}; train it first: "
                                  f"allformers imagine --model {model} --train [--quick] \"a caption\"")
    elif train:
        raise AllformersError(f"--train takes a recipe name ({', '.join(sorted(T2I_RECIPES))}), not {model!r}")
    return path


def imagine(model, captions: list, *, steps: int = 25, guidance: float = 3.0, seed: int = 0,
            temperature: float = 1.0, top_k=32, super_res: bool = True, progress: bool = True,
            guidance_rescale: float = 0.0):
    """Captions -> (B, 3, H, W) pictures in [0, 1] from a loaded DALLE or TextToImage (with its tokenizer)."""
    import torch

    from ..errors import AllformersError
    from ..models.dalle import DALLE
    from ..models.text_to_image import TextToImage

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise AllformersError("the model folder has no tokenizer.json; save text-to-image models with their tokenizer")
    gen = torch.Generator().manual_seed(seed)
    ids, mask = tok.encode_padded(captions, model.config.text_length)
    if isinstance(model, DALLE):
        return model.generate(ids, temperature=temperature, top_k=top_k, generator=gen, progress=progress)
    if isinstance(model, TextToImage):
        return model.generate(ids, mask, guidance_scale=guidance, num_inference_steps=steps, generator=gen,
                              progress=progress, super_res=super_res, guidance_rescale=guidance_rescale)
    raise AllformersError(f"{type(model).__name__} is not a text-to-image model (DALL-E or a diffusion pipeline)")


def run(args):
    import torch

    from ..errors import AllformersError
    from .common import load_any

    if args.list:
        from ..recipes import describe, get_recipe
        from ..recipes.text_to_image import T2I_RECIPES

        print(describe(get_recipe(n) for n in T2I_RECIPES))
        return 0
    if not args.model:
        raise AllformersError("pass --model (a saved text-to-image folder or a recipe name; see --list)")
    if not args.captions:
        raise AllformersError('pass at least one caption, e.g. allformers imagine "a red circle above a blue square"')
    if args.samples < 1 or args.steps < 1:
        raise AllformersError(f"--samples and --steps must be at least 1 (got {args.samples}, {args.steps})")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_any(str(resolve(args.model, args.train, args.quick, not args.no_progress)))
    prompts = [c for _ in range(args.samples) for c in args.captions]  # row r = sample r of every caption
    pictures = imagine(model, prompts, steps=args.steps, guidance=args.guidance, seed=args.seed,
                       temperature=args.temperature, top_k=args.top_k, super_res=not args.no_super_res,
                       progress=not args.no_progress, guidance_rescale=args.guidance_rescale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(prompts) == 1 and not args.grid:
        from PIL import Image

        array = (pictures[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        image = Image.fromarray(array)
        image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST).save(out)
    else:
        from ..recipes.text_to_image import save_grid

        n = len(args.captions)
        rows = {f"sample {r + 1}": pictures[r * n:(r + 1) * n] for r in range(args.samples)}
        save_grid(rows, args.captions, out)
    print(f"{out} ({len(prompts)} picture{'s' if len(prompts) > 1 else ''} of {pictures.shape[-1]} x "
          f"{pictures.shape[-2]} from {type(model).__name__})")
    return 0
