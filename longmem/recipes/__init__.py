"""Recipes: whole pipelines as cached stages (``longmem-recipe NAME OUT``; docs/recipes.md).

    longmem-recipe smollm2 smollm2_out                    # LongMem over SmolLM2-135M, about an hour on 2 cores
    longmem-recipe smollm2 out --preset configs/longmem_smollm2_demo.sh --until data-bin

(``python -m longmem.recipes`` is the same.) Every argument and the preset are checked before the first stage.
"""
import argparse
import logging
import sys

from longmem.recipes import smollm2
from longmem.utils.cli import exit_on_config_error

RECIPES = {"smollm2": smollm2}


def main(argv=None):
    return exit_on_config_error(run, argv)


def run(argv=None):
    p = argparse.ArgumentParser(prog="longmem-recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="recipe", required=True)
    parsers = {}
    for name, module in RECIPES.items():
        parsers[name] = sub.add_parser(name, help=module.__doc__.split("\n")[0], description=module.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parsers[name])
    args = p.parse_args(argv)
    module = RECIPES[args.recipe]
    cfg = module.check(parsers[args.recipe], args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s", stream=sys.stdout)
    out = module.run_recipe(args, cfg)
    print(f"done: {out} (stages up to {args.until or 'the last'})")


if __name__ == "__main__":
    main()
