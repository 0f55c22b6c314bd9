"""The release's `preprocess/filter_shard_tnlg.py` (its Pile sampling, longmem/commands/filter_shard_tnlg.py), in
front of `longmem-prepare-pile`."""
from longmem.commands.filter_shard_tnlg import main

if __name__ == "__main__":
    main()
