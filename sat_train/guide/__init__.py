"""The SAT step: its settings, the saliency capture (hooks), the guided loss (guidance), the drop-in API for
other trainers (dropin) and SAG sampling (sag)."""
