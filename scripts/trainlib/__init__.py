"""Helpers of scripts/train.py: config schema, resumable data order, checkpoints and metric logs."""
