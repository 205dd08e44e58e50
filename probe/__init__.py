"""maxa: probe."""
