"""maxa: pipelines."""
