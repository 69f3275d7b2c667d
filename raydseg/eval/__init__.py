"""Evaluation: eval-set readers, confusion matrices, pseudo-class -> class matching, analyses and reports."""
