"""The `salt` command line (click)."""
