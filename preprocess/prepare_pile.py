"""The command `longmem-prepare-pile` (longmem/commands/prepare_pile.py), at its path of the release's layout."""
from longmem.commands.prepare_pile import main

if __name__ == "__main__":
    main()
