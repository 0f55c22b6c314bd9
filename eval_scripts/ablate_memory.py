"""The command `longmem-ablate-memory` (longmem/commands/ablate_memory.py), at its path of the release's layout."""
from longmem.commands.ablate_memory import main

if __name__ == "__main__":
    main()
