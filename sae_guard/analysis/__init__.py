"""Analyses built on guards and SAEs (above adapters in the layers)."""
