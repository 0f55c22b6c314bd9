"""fairseq's named architectures (``--arch newgpt-tiny``, ``--arch transformer_lm_sidenet_tiny`` ...) are functions
that fill the options a command line left out; this builds one from the defaults it fills."""


def arch_defaults(**defaults):
    """The function ``register_model_architecture`` takes: each option not given takes its value here."""
    def arch(args):
        for name, value in defaults.items():
            setattr(args, name, getattr(args, name, value))

    return arch
