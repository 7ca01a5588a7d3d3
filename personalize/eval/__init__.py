"""Evaluation: configs, the runner, datasets, metrics, baselines, significance, reports, calibration."""
