"""Concept erasure in text-to-image pipelines, measured: methods (our gate and baselines), image scorers, the
suite that runs them on the same prompts and seeds, its report, and the `demo` / `generate` / `bench` commands.

Submodules are imported where used (`sae_guard.erasure.suite`, ...), so the CLI loads none of them to parse
its arguments.
"""
