"""maxa: store."""
