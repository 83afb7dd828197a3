"""Built-in planners, one per file, each named after its registry name."""
