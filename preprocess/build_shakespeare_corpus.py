"""The command `longmem-build-shakespeare-corpus` (longmem/commands/build_shakespeare_corpus.py), at its path of the release's layout."""
from longmem.commands.build_shakespeare_corpus import main

if __name__ == "__main__":
    main()
