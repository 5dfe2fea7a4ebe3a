"""Face metrics and the comparison report (``python -m sat_train.compare``, ``--sample_metrics``)."""
