"""The command `longmem-build-broad-corpus` (longmem/commands/build_broad_corpus.py), beside the other preprocessing steps."""
from longmem.commands.build_broad_corpus import main

if __name__ == "__main__":
    main()
