"""One module per ``jaxprune`` subcommand, each with ``add_parser(subparsers)``; the parser's ``run`` does the job."""
