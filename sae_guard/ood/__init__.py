"""Out-of-distribution detection with SAE features, beside the usual baselines.

    from sae_guard.ood.detector import OODDetector       # fit on in-distribution images, score new ones

Submodules are imported where used, so the CLI loads none of them to parse its arguments: `detector` (the scores),
`benchmark` (ShapesWorld and photo splits, AUROC and FPR95 per split), `commands` (`sae-guard ood`).
"""
