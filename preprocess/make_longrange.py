"""The command `longmem-make-longrange` (longmem/commands/make_longrange.py), at its path of the release's layout."""
from longmem.commands.make_longrange import main

if __name__ == "__main__":
    main()
