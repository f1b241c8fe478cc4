"""The command-line commands, one module each: ``add_parser(sub)`` adds the sub-parser, ``run(args)``
does the work and returns the exit code. :mod:`fakescope.commands.args` holds the shared argument types."""
