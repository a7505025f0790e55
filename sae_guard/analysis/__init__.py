"""Analyses built on guarded models and SAEs: recommender concept dictionaries, detox steering tiers and toxicity
scoring, attention-output SAE head reports, conceptual
blindspots of a text-to-image model (`commands`: their CLI).

The top library layer under cli/pipelines/benchmarks: it may import sae, hooks, train, concepts and adapters, and
nothing imports it from below.
"""
