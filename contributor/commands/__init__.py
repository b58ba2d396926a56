"""The contributor's subcommands, one module each: `add_parser(sub)` declares it, `run(args)`."""
