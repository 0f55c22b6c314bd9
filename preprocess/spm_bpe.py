"""The command `longmem-spm-bpe` (longmem/commands/spm_bpe.py), at its path of the release's layout."""
from longmem.commands.spm_bpe import main

if __name__ == "__main__":
    main()
