"""KFP pipeline definitions, one per file."""
