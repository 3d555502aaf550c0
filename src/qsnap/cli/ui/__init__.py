"""`qsnap ui`: the full-screen terminal view (Textual). Imported only by `qsnap ui` and its tests."""
