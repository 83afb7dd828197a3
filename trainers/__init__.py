"""Built-in trainer plug-ins, one per file, registered through the ``autoseg.plugins`` entry points."""
