"""Analyses built on guarded models: detox steering tiers, toxicity scoring, prompt sets.

The top library layer under cli/pipelines/benchmarks: it may import sae, hooks, train, concepts and
adapters, and nothing imports it from below.
"""
