"""The command `longmem-eval-lm` (longmem/commands/eval_lm.py), at its path of the release's layout."""
from longmem.commands.eval_lm import main

if __name__ == "__main__":
    main()
