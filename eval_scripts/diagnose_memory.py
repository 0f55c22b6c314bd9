"""The command `longmem-diagnose-memory` (longmem/commands/diagnose_memory.py), at its path of the release's layout."""
from longmem.commands.diagnose_memory import main

if __name__ == "__main__":
    main()
