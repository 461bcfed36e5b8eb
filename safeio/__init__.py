"""What every command line of this project needs to be safe at the edges, below all the other packages (it imports
none of them, and no torch): output folders written atomically that never replace what they must not
(:mod:`safeio.staging`), and plain-text errors with SIGTERM/SIGHUP handled like Ctrl-C (:mod:`safeio.terminal`)."""
