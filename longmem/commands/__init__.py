"""The command-line programs, each a ``console_scripts`` entry point of the package (setup.py) whose
``main(argv=None)`` is also importable. The files under ``eval_scripts/`` and ``preprocess/`` call them, so the
release's command lines (``python eval_scripts/eval_longmem_icl.py --path ...``) keep working.

A ``ConfigError`` raised below a ``main`` ends the program with ``prog: error: message`` and exit code 2
(argparse's own exit), never a traceback."""
