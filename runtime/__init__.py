"""maxa runtime: what both stages share, below the store format.

``runtime.errors`` (the one-line errors), ``runtime.settings`` (every ``MAXA_*`` environment
variable), ``runtime.devices`` (``--device`` → a torch device) and ``runtime.provenance`` (what a
store or result records about how it was made). ``extract`` and ``probe`` stand side by side on
``store`` and this package and never import each other; this package imports none of them.
Nothing is imported here, so ``import runtime.settings`` does not pull in torch.
"""
