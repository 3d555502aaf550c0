"""Models, errors, names, configuration and the subprocess call site (the bottom layer)."""
