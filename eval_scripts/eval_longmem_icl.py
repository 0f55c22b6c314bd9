"""The command `longmem-eval-icl` (longmem/commands/eval_icl.py), at its path of the release's layout."""
from longmem.commands.eval_icl import main

if __name__ == "__main__":
    main()
