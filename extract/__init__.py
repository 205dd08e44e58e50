"""maxa: extract."""
