"""Concepts: picking the features of a concept, scoring inputs, calibrating thresholds, verdicts."""

from .concept import MIN_CALIBRATE, Concept, PoorConceptWarning, load_concepts, save_concepts, threshold_at_fpr
from .policy import ConceptPolicy, Verdict, merge_verdicts
from .selection import STRATEGIES

__all__ = ["MIN_CALIBRATE", "Concept", "ConceptPolicy", "PoorConceptWarning", "STRATEGIES", "Verdict", "load_concepts", "merge_verdicts", "save_concepts",
           "threshold_at_fpr"]
