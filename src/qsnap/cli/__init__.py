"""The command-line layer: `qsnap` (main.py) and `manage-snapshots` (guide.py)."""
