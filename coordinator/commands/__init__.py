"""The subcommands of `gaggle-coordinator`, one module each: `add_parser(sub)` and `run(args)`."""
